// Package ca is the mesh's certificate authority: it signs the workload
// certificates that carry each pod's SPIFFE identity, and serves Istio's
// certificate API for the sidecars' agents.
//
// Signing material, in order of preference:
//
//   - Plug-in CA: Istio's cacerts Secret in the control plane's namespace
//     (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem), so a user's
//     own PKI works. ca-cert.pem signs, typically an intermediate; the chain
//     handed out is the leaf, then cert-chain.pem, then the root.
//   - Self-signed root (the default): an ECDSA P-256 root kept in the Secret
//     istio-ca-secret (Istio's name and keys). It is created once: every
//     replica that finds no Secret tries to Create it and the API server
//     arbitrates; the loser reads the winner's (create-if-absent), so
//     concurrent replicas never end up with two roots.
//
// The root reaches every namespace as the ConfigMap istio-ca-root-cert (key
// root-cert.pem) through [Publisher], which watches namespaces and those
// ConfigMaps and restores one that is edited or deleted.
//
// [Server] implements istio.v1.auth.IstioCertificateService/CreateCertificate
// over gRPC with TLS (port 15012). A caller authenticates with a projected
// service-account token (audience istio-ca) in the gRPC metadata
// "authorization: Bearer <token>", checked with a TokenReview; the issued
// certificate carries exactly spiffe://<trust domain>/ns/<ns>/sa/<sa> of that
// token as its URI SAN, and a CSR that asks for any other SAN is refused.
//
// RBAC: get, list, watch, create on secrets in the control plane's
// namespace; get, list, watch, create, update on configmaps in every
// namespace; get, list, watch on namespaces; create on tokenreviews.
package ca
