// Package registration builds the MutatingWebhookConfiguration that registers
// the meshlet injector with the API server. The Helm chart templates the same
// shape; testdata/mutatingwebhookconfiguration.golden.yaml is the rendered
// reference (regenerate with `go test ./webhook/registration -update`).
//
// The shape follows Istio's sidecar injector, two webhooks calling the same
// endpoint:
//
//	namespace.sidecar-injector.meshlet.io
//	  namespaceSelector: istio-injection In [enabled]
//	                     kubernetes.io/metadata.name NotIn [kube-system, kube-public, <webhook namespace>]
//	  objectSelector:    sidecar.istio.io/inject NotIn [false]
//	object.sidecar-injector.meshlet.io
//	  namespaceSelector: istio-injection DoesNotExist
//	                     kubernetes.io/metadata.name NotIn [kube-system, kube-public, <webhook namespace>]
//	  objectSelector:    sidecar.istio.io/inject In [true]
//
// Both: rules CREATE of v1 pods only; failurePolicy Fail; sideEffects None;
// reinvocationPolicy IfNeeded (the injector runs again if a later webhook
// changed the pod; re-injection is idempotent); admissionReviewVersions [v1];
// matchPolicy Equivalent; timeoutSeconds 5; clientConfig.service
// {namespace, name, port 443, path /inject}; caBundle left empty — the webhook
// fills it (self-issued certificates) or cert-manager's cainjector does.
//
// A namespace labelled istio-injection=disabled therefore never reaches the
// webhook, even for pods labelled sidecar.istio.io/inject=true (Istio's rule).
// The selectors are a first filter only: the injection core decides again
// from the pod and namespace, so a pod that slips through is left untouched.
package registration

import (
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/webhook/inject"
)

// Labels and webhook names of the configuration.
const (
	// NamespaceLabel enables injection for a namespace (value "enabled").
	NamespaceLabel = inject.LabelNamespaceInjection
	// PodLabel opts a pod in ("true") or out ("false").
	PodLabel = inject.LabelInject
	// MetadataNameLabel is set by the API server on every namespace to its name.
	MetadataNameLabel = "kubernetes.io/metadata.name"

	// NamespaceWebhookName is the namespace-selected webhook.
	NamespaceWebhookName = "namespace.sidecar-injector.meshlet.io"
	// ObjectWebhookName is the object-selected webhook.
	ObjectWebhookName = "object.sidecar-injector.meshlet.io"

	// DefaultName of the MutatingWebhookConfiguration.
	DefaultName = "meshlet-sidecar-injector"
	// DefaultPath the webhook serves.
	DefaultPath = "/inject"
	// DefaultServicePort is the Service port the API server dials.
	DefaultServicePort = 443
	// DefaultTimeoutSeconds bounds each call: short, so a slow webhook fails
	// the pod creation quickly instead of stalling a rollout.
	DefaultTimeoutSeconds = 5
)

// Options describe one webhook deployment.
type Options struct {
	// Name of the MutatingWebhookConfiguration (DefaultName if empty).
	Name string
	// Namespace the webhook runs in; it is excluded from injection.
	Namespace string
	// ServiceName, ServicePort and Path locate the webhook behind a Service.
	ServiceName string
	ServicePort int32
	Path        string
	// URL, when set, replaces the Service reference (out-of-cluster webhooks
	// and tests).
	URL string
	// CABundle to start with (normally empty; the webhook fills it).
	CABundle []byte
	// TimeoutSeconds per call (DefaultTimeoutSeconds if zero).
	TimeoutSeconds int32
	// ExcludedNamespaces are never injected, in addition to kube-system,
	// kube-public and Namespace.
	ExcludedNamespaces []string
	// Labels for the object's metadata.
	Labels map[string]string
}

// Build returns the MutatingWebhookConfiguration for opts.
func Build(opts Options) *admissionregistrationv1.MutatingWebhookConfiguration {
	if opts.Name == "" {
		opts.Name = DefaultName
	}
	if opts.Path == "" {
		opts.Path = DefaultPath
	}
	if opts.ServicePort == 0 {
		opts.ServicePort = DefaultServicePort
	}
	if opts.TimeoutSeconds == 0 {
		opts.TimeoutSeconds = DefaultTimeoutSeconds
	}
	excluded := []string{"kube-system", "kube-public"}
	if opts.Namespace != "" {
		excluded = append(excluded, opts.Namespace)
	}
	excluded = append(excluded, opts.ExcludedNamespaces...)
	notExcluded := metav1.LabelSelectorRequirement{Key: MetadataNameLabel, Operator: metav1.LabelSelectorOpNotIn, Values: excluded}

	client := admissionregistrationv1.WebhookClientConfig{CABundle: opts.CABundle}
	if opts.URL != "" {
		u := opts.URL
		client.URL = &u
	} else {
		path, port := opts.Path, opts.ServicePort
		client.Service = &admissionregistrationv1.ServiceReference{
			Namespace: opts.Namespace, Name: opts.ServiceName, Path: &path, Port: &port,
		}
	}
	entry := func(name string, ns, obj []metav1.LabelSelectorRequirement) admissionregistrationv1.MutatingWebhook {
		fail := admissionregistrationv1.Fail
		none := admissionregistrationv1.SideEffectClassNone
		ifNeeded := admissionregistrationv1.IfNeededReinvocationPolicy
		equivalent := admissionregistrationv1.Equivalent
		timeout := opts.TimeoutSeconds
		scope := admissionregistrationv1.NamespacedScope
		return admissionregistrationv1.MutatingWebhook{
			Name:         name,
			ClientConfig: client,
			Rules: []admissionregistrationv1.RuleWithOperations{{
				Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
				Rule: admissionregistrationv1.Rule{
					APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}, Scope: &scope,
				},
			}},
			FailurePolicy:           &fail,
			MatchPolicy:             &equivalent,
			NamespaceSelector:       &metav1.LabelSelector{MatchExpressions: ns},
			ObjectSelector:          &metav1.LabelSelector{MatchExpressions: obj},
			SideEffects:             &none,
			TimeoutSeconds:          &timeout,
			AdmissionReviewVersions: []string{"v1"},
			ReinvocationPolicy:      &ifNeeded,
		}
	}
	return &admissionregistrationv1.MutatingWebhookConfiguration{
		TypeMeta:   metav1.TypeMeta{APIVersion: "admissionregistration.k8s.io/v1", Kind: "MutatingWebhookConfiguration"},
		ObjectMeta: metav1.ObjectMeta{Name: opts.Name, Labels: opts.Labels},
		Webhooks: []admissionregistrationv1.MutatingWebhook{
			entry(NamespaceWebhookName,
				[]metav1.LabelSelectorRequirement{
					{Key: NamespaceLabel, Operator: metav1.LabelSelectorOpIn, Values: []string{"enabled"}},
					notExcluded,
				},
				[]metav1.LabelSelectorRequirement{
					{Key: PodLabel, Operator: metav1.LabelSelectorOpNotIn, Values: []string{"false"}},
				}),
			entry(ObjectWebhookName,
				[]metav1.LabelSelectorRequirement{
					{Key: NamespaceLabel, Operator: metav1.LabelSelectorOpDoesNotExist},
					notExcluded,
				},
				[]metav1.LabelSelectorRequirement{
					{Key: PodLabel, Operator: metav1.LabelSelectorOpIn, Values: []string{"true"}},
				}),
		},
	}
}
