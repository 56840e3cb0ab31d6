// Package v1alpha1 is the lb.stickylb.io/v1alpha1 API: LoadBalancerRule, a
// layer-4 load-balancing rule with Azure Load Balancer's field names and
// session-persistence modes.
//
// +kubebuilder:object:generate=true
// +groupName=lb.stickylb.io
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the API group and version of every type in this package.
	GroupVersion = schema.GroupVersion{Group: "lb.stickylb.io", Version: "v1alpha1"}

	// SchemeBuilder registers this package's types with a runtime.Scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds this package's types to a runtime.Scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
