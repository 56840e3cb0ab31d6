package rulesfile

import (
	"context"
	"fmt"
	"sync"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/defaulting"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/listtype"
	schemaobjectmeta "k8s.io/apiextensions-apiserver/pkg/apiserver/schema/objectmeta"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning"
	apiservervalidation "k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"sigs.k8s.io/yaml"

	"github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/config/crd"
)

// schema is the LoadBalancerRule schema of the embedded CRD, prepared the way
// the API server prepares it to serve the resource: structural (for pruning,
// defaulting and list-type checks), OpenAPI (for value validation) and CEL
// (for x-kubernetes-validations).
type schema struct {
	structural *structuralschema.Structural
	openAPI    apiservervalidation.SchemaValidator
	cel        *cel.Validator // nil when the schema has no CEL rules
}

// ruleSchema builds the schema once; compiling the CEL programs is the
// expensive part and every Parse after the first reuses them.
var ruleSchema = sync.OnceValues(func() (*schema, error) {
	return newSchema(crd.LoadBalancerRuleCRD)
})

func newSchema(crdYAML []byte) (*schema, error) {
	var def apiextensionsv1.CustomResourceDefinition
	if err := yaml.UnmarshalStrict(crdYAML, &def); err != nil {
		return nil, fmt.Errorf("decode embedded CRD: %w", err)
	}
	if def.Spec.Group != v1alpha1.GroupVersion.Group || def.Spec.Names.Kind != kind {
		return nil, fmt.Errorf("embedded CRD %s is not for %s", def.Name, apiVersion)
	}
	var v1Validation *apiextensionsv1.CustomResourceValidation
	for i := range def.Spec.Versions {
		if def.Spec.Versions[i].Name == v1alpha1.GroupVersion.Version {
			v1Validation = def.Spec.Versions[i].Schema
		}
	}
	if v1Validation == nil || v1Validation.OpenAPIV3Schema == nil {
		return nil, fmt.Errorf("embedded CRD %s has no schema for version %s", def.Name, v1alpha1.GroupVersion.Version)
	}

	var internal apiextensions.CustomResourceValidation
	if err := apiextensionsv1.Convert_v1_CustomResourceValidation_To_apiextensions_CustomResourceValidation(v1Validation, &internal, nil); err != nil {
		return nil, fmt.Errorf("convert CRD schema: %w", err)
	}
	s, err := structuralschema.NewStructural(internal.OpenAPIV3Schema)
	if err != nil {
		return nil, fmt.Errorf("structural schema: %w", err)
	}
	// As the API server does: own a copy and drop defaults that would not
	// survive pruning.
	s = s.DeepCopy()
	if err := defaulting.PruneDefaults(s); err != nil {
		return nil, fmt.Errorf("prune schema defaults: %w", err)
	}
	openAPI, _, err := apiservervalidation.NewSchemaValidator(internal.OpenAPIV3Schema)
	if err != nil {
		return nil, fmt.Errorf("OpenAPI validator: %w", err)
	}
	return &schema{
		structural: s,
		openAPI:    openAPI,
		cel:        cel.NewValidator(s, true, celconfig.PerCallLimit),
	}, nil
}

// prune does to obj what decoding a create request with strict field
// validation does: it drops fields the schema does not know, returning their
// paths, and drops nulls that have no default. obj is changed in place.
func (s *schema) prune(obj map[string]any) (unknown []string, err *field.Error) {
	unknown = pruning.PruneWithOptions(obj, s.structural, true, structuralschema.UnknownFieldPathOptions{TrackUnknownFieldPaths: true})
	defaulting.PruneNonNullableNullsWithoutDefaults(obj, s.structural)
	err, embedded := schemaobjectmeta.CoerceWithOptions(nil, obj, s.structural, false, schemaobjectmeta.CoerceOptions{ReturnUnknownFieldPaths: true})
	return append(unknown, embedded...), err
}

// applyDefaults sets the schema's defaults in obj.
func (s *schema) applyDefaults(obj map[string]any) { defaulting.Default(obj, s.structural) }

// validate checks obj as the API server's create does after defaulting: the
// OpenAPI schema, list types, then the CEL rules.
func (s *schema) validate(ctx context.Context, obj map[string]any) field.ErrorList {
	var errs field.ErrorList
	errs = append(errs, apiservervalidation.ValidateCustomResource(nil, obj, s.openAPI)...)
	errs = append(errs, schemaobjectmeta.Validate(ctx, nil, obj, s.structural, false)...)
	errs = append(errs, listtype.ValidateListSetsAndMaps(nil, s.structural, obj)...)
	if s.cel == nil {
		return errs
	}
	// The API server skips CEL when the value is structurally wrong (a rule
	// would only trip over the same mistake) and says so.
	if blocking(errs) {
		return append(errs, field.Invalid(nil, nil, "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation"))
	}
	celErrs, _ := s.cel.Validate(ctx, nil, s.structural, obj, nil, celconfig.RuntimeCELCostBudget)
	return append(errs, celErrs...)
}

// blocking reports the error kinds after which the API server does not run
// CEL rules.
func blocking(errs field.ErrorList) bool {
	for _, e := range errs {
		switch e.Type {
		case field.ErrorTypeNotSupported, field.ErrorTypeRequired, field.ErrorTypeTooLong, field.ErrorTypeTooMany, field.ErrorTypeTypeInvalid:
			return true
		}
	}
	return false
}
