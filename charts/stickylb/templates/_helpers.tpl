{{/* The chart name, for the app.kubernetes.io/name label. */}}
{{- define "stickylb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, with the chart name appended unless already in it. */}}
{{- define "stickylb.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select this release's manager pods (also the dataplane pod selector). */}}
{{- define "stickylb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stickylb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stickylb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "stickylb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stickylb
{{- end }}

{{- define "stickylb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stickylb.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stickylb.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the peer key: peers.existingSecret, else the one the chart makes. */}}
{{- define "stickylb.peersSecretName" -}}
{{- default (printf "%s-peers" (include "stickylb.fullname" .)) .Values.peers.existingSecret }}
{{- end }}

{{/* The metrics Service's port name, which the ServiceMonitor scrapes. */}}
{{- define "stickylb.metricsPortName" -}}
https
{{- end }}

{{/* Labels that select the metrics Service and no other. */}}
{{- define "stickylb.metricsServiceSelector" -}}
{{ include "stickylb.selectorLabels" . }}
app.kubernetes.io/component: metrics
{{- end }}
