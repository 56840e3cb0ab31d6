// Package rulesfile reads the rules file of the standalone proxy
// (`stickylb proxy --rules FILE`): LoadBalancerRules in a multi-document
// YAML file, checked with the same schema, defaults and CEL rules the API
// server applies to them, so that a file the proxy accepts is a file
// `kubectl apply --validate=strict` accepts, and the other way round.
package rulesfile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	schemaobjectmeta "k8s.io/apiextensions-apiserver/pkg/apiserver/schema/objectmeta"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"sigs.k8s.io/yaml"

	"github.com/stickylb/stickylb/api/v1alpha1"
)

const (
	kind             = "LoadBalancerRule"
	defaultNamespace = metav1.NamespaceDefault
)

var apiVersion = v1alpha1.GroupVersion.String()

// Parse reads the LoadBalancerRules in data, a YAML file called name (used in
// error messages only). Documents are separated by `---` lines; empty ones
// are skipped. Each rule is pruned, defaulted and validated as the API server
// would on create; a rule without a namespace is in "default". Fields the API
// server sets itself (uid, resourceVersion, creationTimestamp, generation,
// managedFields, status) are reset, so the output of `kubectl get -o yaml`
// reads as the rule it describes.
//
// The error, if any, joins one error per problem in every document, each
// naming the file, the document (1-based) and rule, and the field, such as
//
//	rules.yaml: document 2 (web): spec.frontend.port: Invalid value: 0: spec.frontend.port in body should be greater than or equal to 1
func Parse(name string, data []byte) ([]v1alpha1.LoadBalancerRule, error) {
	s, err := ruleSchema()
	if err != nil {
		return nil, fmt.Errorf("%s: LoadBalancerRule schema: %w", name, err)
	}
	var (
		rules []v1alpha1.LoadBalancerRule
		errs  []error
		// seen maps namespace/name to the document that defined it.
		seen = map[string]int{}
	)
	for _, doc := range splitDocuments(data) {
		rule, present, docErrs := s.parseDocument(doc)
		where := fmt.Sprintf("%s: document %d", name, doc.number)
		if rule.Name != "" {
			where += " (" + rule.Name + ")"
		}
		for _, e := range docErrs {
			errs = append(errs, fmt.Errorf("%s: %w", where, e))
		}
		if !present || len(docErrs) > 0 {
			continue
		}
		key := rule.Namespace + "/" + rule.Name
		if first, dup := seen[key]; dup {
			errs = append(errs, fmt.Errorf("%s: rule %s is already defined in document %d", where, key, first))
			continue
		}
		seen[key] = doc.number
		rules = append(rules, rule)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return rules, nil
}

// document is one YAML document of a rules file.
type document struct {
	number int // 1-based, as YAML counts documents
	line   int // line of the file where its text starts
	data   []byte
}

// splitDocuments cuts data at separator lines (`---`, alone or followed by a
// comment: the rule kubectl applies). Comments before the first separator
// are not a document.
func splitDocuments(data []byte) []document {
	var docs []document
	start, first, line := 0, 1, 1
	for off := 0; off < len(data); line++ {
		next := len(data)
		if i := bytes.IndexByte(data[off:], '\n'); i >= 0 {
			next = off + i + 1
		}
		if isSeparator(data[off:next]) {
			docs = append(docs, document{line: first, data: data[start:off]})
			start, first = next, line+1
		}
		off = next
	}
	docs = append(docs, document{line: first, data: data[start:]})
	if len(docs) > 1 && onlyComments(docs[0].data) {
		docs = docs[1:]
	}
	for i := range docs {
		docs[i].number = i + 1
	}
	return docs
}

func isSeparator(line []byte) bool {
	rest, ok := bytes.CutPrefix(line, []byte("---"))
	if !ok {
		return false
	}
	rest = bytes.TrimSpace(rest)
	return len(rest) == 0 || rest[0] == '#'
}

func onlyComments(text []byte) bool {
	for line := range bytes.Lines(text) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			return false
		}
	}
	return true
}

// yamlLine finds line numbers in the YAML parser's errors, which count from
// the start of the document.
var yamlLine = regexp.MustCompile(`\bline (\d+)\b`)

// parseDocument returns the rule in doc; present is false for an empty
// document. The rule's name is set whenever the document has one, even with
// errors, so that they can name the rule.
func (s *schema) parseDocument(doc document) (rule v1alpha1.LoadBalancerRule, present bool, errs []error) {
	j, err := yaml.YAMLToJSONStrict(doc.data)
	if err != nil {
		msg := yamlLine.ReplaceAllStringFunc(err.Error(), func(m string) string {
			n, _ := strconv.Atoi(strings.TrimPrefix(m, "line "))
			return "line " + strconv.Itoa(doc.line+n-1)
		})
		return rule, true, []error{errors.New(msg)}
	}
	var value any
	if err := utiljson.Unmarshal(j, &value); err != nil {
		return rule, true, []error{err}
	}
	if value == nil {
		return rule, false, nil
	}
	obj, ok := value.(map[string]any)
	if !ok {
		return rule, true, []error{fmt.Errorf("want a %s object, got %s", kind, describe(value))}
	}
	rule.Name, _ = nestedString(obj, "metadata", "name")
	if ferrs := checkTypeMeta(obj); len(ferrs) > 0 {
		return rule, true, fieldErrors(ferrs)
	}

	// The order of a create: decode (metadata strictly, then prune the rest),
	// default, drop status, validate metadata and the rest.
	meta, unknown, err := objectMeta(obj)
	if err != nil {
		return rule, true, []error{err}
	}
	pruned, coerceErr := s.prune(obj)
	unknown = append(unknown, pruned...)
	if coerceErr != nil {
		errs = append(errs, coerceErr)
	}
	for _, path := range unknown {
		errs = append(errs, fmt.Errorf("unknown field %q", path))
	}
	if err := schemaobjectmeta.SetObjectMeta(obj, meta); err != nil {
		return rule, true, append(errs, err)
	}
	s.applyDefaults(obj)
	delete(obj, "status")
	ferrs := validateMeta(meta)
	ferrs = append(ferrs, s.validate(context.Background(), obj)...)
	errs = append(errs, fieldErrors(ferrs)...)
	if len(errs) > 0 {
		return rule, true, errs
	}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj, &rule); err != nil {
		return rule, true, []error{fmt.Errorf("decode: %w", err)}
	}
	return rule, true, nil
}

// checkTypeMeta rejects anything but a LoadBalancerRule of this API version.
func checkTypeMeta(obj map[string]any) field.ErrorList {
	var errs field.ErrorList
	check := func(key, want string) {
		switch v, ok := obj[key]; {
		case !ok || v == nil || v == "":
			errs = append(errs, field.Required(field.NewPath(key), "must be "+want))
		case v != want:
			errs = append(errs, field.Invalid(field.NewPath(key), v, "must be "+want))
		}
	}
	check("kind", kind)
	check("apiVersion", apiVersion)
	return errs
}

// objectMeta decodes metadata as the API server does, reporting unknown
// fields, then resets the fields the API server sets itself on create and
// defaults the namespace.
func objectMeta(obj map[string]any) (*metav1.ObjectMeta, []string, error) {
	meta, _, unknown, err := schemaobjectmeta.GetObjectMetaWithOptions(obj, schemaobjectmeta.ObjectMetaOptions{ReturnUnknownFieldPaths: true})
	if err != nil {
		return nil, nil, fmt.Errorf("metadata: %w", err)
	}
	if meta == nil {
		meta = &metav1.ObjectMeta{}
	}
	if meta.Namespace == "" {
		meta.Namespace = defaultNamespace
	}
	meta.UID = ""
	meta.ResourceVersion = ""
	meta.CreationTimestamp = metav1.Time{}
	meta.DeletionTimestamp = nil
	meta.DeletionGracePeriodSeconds = nil
	meta.ManagedFields = nil
	meta.SelfLink = ""
	meta.Generation = 1
	return meta, unknown, nil
}

// validateMeta applies the API server's metadata rules for a namespaced
// object named by a DNS subdomain, and requires a name: in a file there is
// no one to generate it.
func validateMeta(meta *metav1.ObjectMeta) field.ErrorList {
	errs := apivalidation.ValidateObjectMeta(meta, true, apivalidation.NameIsDNSSubdomain, field.NewPath("metadata"))
	if meta.Name == "" && meta.GenerateName != "" {
		errs = append(errs, field.Required(field.NewPath("metadata", "name"), "a rules file needs a name for every rule"))
	}
	return errs
}

// fieldErrors keeps the API server's wording; an error about the whole
// object is just its message.
func fieldErrors(list field.ErrorList) []error {
	out := make([]error, 0, len(list))
	for _, e := range list {
		if e.Field == "" || e.Field == "<nil>" {
			out = append(out, errors.New(e.Detail))
			continue
		}
		out = append(out, e)
	}
	return out
}

func nestedString(obj map[string]any, keys ...string) (string, bool) {
	var cur any = obj
	for _, k := range keys {
		m, ok := cur.(map[string]any)
		if !ok {
			return "", false
		}
		cur = m[k]
	}
	s, ok := cur.(string)
	return s, ok
}

func describe(v any) string {
	switch v.(type) {
	case []any:
		return "a list"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case int64, float64:
		return "a number"
	}
	return fmt.Sprintf("%T", v)
}
