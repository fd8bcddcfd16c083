// Package server is the mutating admission webhook (`meshlet webhook`): a
// controller-runtime webhook server that answers AdmissionReview requests
// for pods with the injection core of package inject, keeps its injection
// config reloaded from a file, and reports readiness only when it can serve
// (listening, namespace cache synced, serving certificate trusted).
package server
