package controllers

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Every dataplane replica publishes what it serves as a Report: one small
// Lease per replica, in the manager's namespace, so that the controller
// role's status speaks for every replica (Programmed, healthy counts) at a
// cost that follows changes, not rules × replicas.
//
// A replica does not list the rules it serves. It says up to which rule
// resourceVersion its snapshot is complete (Covered): every LoadBalancerRule
// change the API server made at or before that version is in what it serves.
// The controller compares that with the version at which it first saw a
// rule's current generation. Beyond that, a report lists only exceptions:
// the rules it cannot listen for, and the rules whose probes it sees down.
// Its size is bounded by problems, and a replica writes it at most once a
// second however many rules change.

const (
	// LabelReport marks the replicas' report Leases.
	LabelReport = "lb.stickylb.io/dataplane-report"
	// annotationReport holds a Report as JSON.
	annotationReport = "lb.stickylb.io/report"
	reportPrefix     = "stickylb-dataplane-"
)

// Report is what one dataplane replica serves.
type Report struct {
	// Replica names the replica: its pod's name, or its bind address outside
	// a cluster.
	Replica string `json:"replica"`
	// Address is where the replica's frontends listen.
	Address string `json:"address"`
	// Snapshot is the version of the snapshot it serves.
	Snapshot uint64 `json:"snapshot"`
	// Covered is the rule resourceVersion its snapshot is complete up to.
	Covered uint64 `json:"covered"`
	// Failed maps "namespace/name" to why the replica cannot serve the rule.
	Failed map[string]string `json:"failed,omitempty"`
	// Down maps "namespace/name" to how many of the rule's ready backends the
	// replica's probes see down (only rules with some).
	Down map[string]int32 `json:"down,omitempty"`
}

// ReportLeaseName is the Lease of a replica's report.
func ReportLeaseName(replica string) string {
	name := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-':
			return r
		case r >= 'A' && r <= 'Z':
			return r + ('a' - 'A')
		}
		return '-' // '.' and ':' of addresses
	}, replica)
	if len(reportPrefix)+len(name) > 253 {
		name = name[:253-len(reportPrefix)]
	}
	return reportPrefix + strings.Trim(name, "-")
}

// PublishedReport is a replica's report as its Lease holds it.
type PublishedReport struct {
	Report
	// Renewed is when the replica last renewed it.
	Renewed time.Time
	// Fresh: the Lease has not expired, so the replica counts for status.
	Fresh bool
}

// ReadReports lists the replicas' reports in namespace, sorted by replica.
func ReadReports(ctx context.Context, c client.Reader, namespace string, now time.Time) ([]PublishedReport, error) {
	var leases coordinationv1.LeaseList
	if err := c.List(ctx, &leases, client.InNamespace(namespace), client.MatchingLabels{LabelReport: "true"}); err != nil {
		return nil, err
	}
	var out []PublishedReport
	for i := range leases.Items {
		l := &leases.Items[i]
		rep, err := decodeReport(l)
		if err != nil {
			continue
		}
		pr := PublishedReport{Report: *rep}
		if l.Spec.RenewTime != nil {
			pr.Renewed = l.Spec.RenewTime.Time
			pr.Fresh = l.Spec.LeaseDurationSeconds != nil && now.Before(pr.Renewed.Add(time.Duration(*l.Spec.LeaseDurationSeconds)*time.Second))
		}
		out = append(out, pr)
	}
	slices.SortFunc(out, func(a, b PublishedReport) int { return cmp.Compare(a.Replica, b.Replica) })
	return out, nil
}

// decodeReport reads the report a Lease carries.
func decodeReport(l *coordinationv1.Lease) (*Report, error) {
	raw, ok := l.Annotations[annotationReport]
	if !ok {
		return nil, fmt.Errorf("lease %s/%s carries no report", l.Namespace, l.Name)
	}
	var r Report
	if err := json.Unmarshal([]byte(raw), &r); err != nil {
		return nil, fmt.Errorf("lease %s/%s: report: %w", l.Namespace, l.Name, err)
	}
	return &r, nil
}

// encode is the report as the annotation's value.
func (r *Report) encode() string {
	b, _ := json.Marshal(r)
	return string(b)
}

// resourceVersion reads an object's resourceVersion as the number etcd gives
// it (its revision, which grows with every write); 0 when it is not one.
func resourceVersion(rv string) uint64 {
	n, err := strconv.ParseUint(rv, 10, 64)
	if err != nil {
		return 0
	}
	return n
}
