// Package crd embeds the generated CustomResourceDefinition, so that a binary
// can validate LoadBalancerRules with exactly the schema the API server uses
// (the standalone proxy checks its rules file this way) or install the CRD.
package crd

import _ "embed"

// LoadBalancerRuleCRD is config/crd/bases/lb.stickylb.io_loadbalancerrules.yaml,
// byte for byte as controller-gen wrote it.
//
//go:embed bases/lb.stickylb.io_loadbalancerrules.yaml
var LoadBalancerRuleCRD []byte
