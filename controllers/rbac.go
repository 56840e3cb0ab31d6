// Package controllers holds the reconcilers of the controller role (conditions,
// frontends, status) and the watches of the dataplane role.
package controllers

// The manager's permissions, generated into config/rbac by controller-gen.
// Grant only what the code uses: no secrets, no wildcards.

// +kubebuilder:rbac:groups=lb.stickylb.io,resources=loadbalancerrules,verbs=get;list;watch
// +kubebuilder:rbac:groups=lb.stickylb.io,resources=loadbalancerrules/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=coordination.k8s.io,resources=leases,verbs=get;list;watch;create;update;patch;delete,namespace=stickylb-system
// +kubebuilder:rbac:groups=core,resources=events,verbs=create;patch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch
