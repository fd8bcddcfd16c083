// Package inject is meshlet's one injection core, shared by the admission
// webhook and `meshlet inject`: a pure function from (pod, namespace,
// injection config, options) to (injected pod, decision). No I/O, no globals,
// no flags.
//
//	cfg, err := inject.LoadConfig(doc)          // or inject.DefaultConfig()
//	out, d, err := inject.Inject(pod, inject.Namespace{Name: "shop", Labels: nsLabels},
//		&cfg, inject.Options{RequireOptIn: true, AutoNativeSidecar: serverIs129})
//	// err != nil: invalid annotations (all of them, errors.Join of
//	//             *AnnotationError naming annotation and value) → reject the pod.
//	// d.Injected, d.Reason, d.Message: what happened and why;
//	// d.Warnings: for the user (admission warnings, CLI log).
//	orig, err := inject.Uninject(out)           // exact inverse, driven by the status annotation
//
// Inject never modifies its input. An already injected pod (one with the
// sidecar.istio.io/status annotation) is returned unchanged, so injection is
// idempotent.
//
// # The config
//
// Config is the versioned document apiVersion: meshlet.io/v1alpha1, kind:
// InjectionConfig. DefaultConfig returns the embedded defaults.yaml (every
// field commented there); LoadConfig overlays a (partial) document on the
// defaults, strictly (unknown fields are errors), and validates it; Validate
// reports every problem at once, each as a *FieldError naming field and value.
//
// # Triggers
//
// With Options.RequireOptIn (the webhook): a namespace labelled
// istio-injection=enabled injects every pod that does not opt out with the
// pod label sidecar.istio.io/inject=false; a namespace labelled
// istio-injection=disabled injects nothing; a namespace without the label
// injects only pods labelled sidecar.istio.io/inject=true. Without it (the
// CLI, like istioctl kube-inject) every pod that does not opt out is
// injected. The label wins over the deprecated annotation of the same name.
// Never injected: hostNetwork pods, already injected pods, kube-system,
// kube-public and Config.WebhookNamespace.
//
// # The injected pod
//
// istio-init (`/usr/local/bin/meshlet init -p 15001 -z 15006 -u 1337 -g 1337
// -m REDIRECT -i * -x "" -b * -d 22,15090,15021,15020 -q "" -o "" -c ""`,
// NET_ADMIN and NET_RAW only) — or in CNI mode istio-validation (`init
// --validate` with the same flags, unprivileged); istio-proxy
// (`/usr/local/bin/meshlet agent --drain-duration=5s`, UID/GID 1337), as a
// native sidecar (initContainers: istio-init, istio-proxy, user init
// containers) or in the classic layout (user init containers, istio-init;
// istio-proxy last among the containers, or first with a postStart
// `meshlet agent wait` when holdApplicationUntilProxyStarts is on); an
// in-memory emptyDir meshlet-runtime at /var/run/meshlet; the annotations
// sidecar.istio.io/status (see Status) and kubectl's default-container ones.
// In CNI mode the effective capture settings are also written as the
// traffic.sidecar.istio.io/* and sidecar.istio.io/interceptionMode
// annotations, which the CNI plugin reads.
package inject
