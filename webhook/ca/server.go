package ca

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlet/meshlet/webhook/certs"
)

// Defaults of the certificate API (Istio's).
const (
	// DefaultAudience is the audience the caller's token must be valid for.
	DefaultAudience = "istio-ca"
	// DefaultWorkloadTTL is a workload certificate's lifetime when the
	// request asks for none.
	DefaultWorkloadTTL = 24 * time.Hour
	// DefaultMaxWorkloadTTL caps what a request may ask for.
	DefaultMaxWorkloadTTL = 90 * 24 * time.Hour
)

// ErrUnauthenticated means the caller's token was missing or not accepted.
var ErrUnauthenticated = errors.New("caller not authenticated")

// Authenticator maps a caller's bearer token to the identity it proves.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (Identity, error)
}

// TokenReviewer authenticates service-account tokens with the API server's
// TokenReview, for one audience.
type TokenReviewer struct {
	// Client creates TokenReviews. Required.
	Client kubernetes.Interface
	// Audience the token must be valid for. Empty means DefaultAudience.
	Audience string
	// TrustDomain of the identities. Empty means DefaultTrustDomain.
	TrustDomain string
}

var _ Authenticator = (*TokenReviewer)(nil)

// Authenticate asks the API server whether token is a valid service-account
// token for the audience and returns that service account's identity.
func (r *TokenReviewer) Authenticate(ctx context.Context, token string) (Identity, error) {
	aud := cmpOr(r.Audience, DefaultAudience)
	tr, err := r.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{aud}},
	}, metav1.CreateOptions{})
	if err != nil {
		return Identity{}, fmt.Errorf("token review: %w", err)
	}
	if !tr.Status.Authenticated {
		reason := tr.Status.Error
		if reason == "" {
			reason = "token not authenticated"
		}
		return Identity{}, fmt.Errorf("%w: %s", ErrUnauthenticated, reason)
	}
	if !slices.Contains(tr.Status.Audiences, aud) {
		return Identity{}, fmt.Errorf("%w: token is not valid for audience %q (valid for %q)", ErrUnauthenticated, aud, tr.Status.Audiences)
	}
	id, err := identityFromUsername(cmpOr(r.TrustDomain, DefaultTrustDomain), tr.Status.User.Username)
	if err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
	}
	return id, nil
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// ServerOptions configure a certificate Server.
type ServerOptions struct {
	// Authenticator checks callers. Required.
	Authenticator Authenticator
	// DefaultTTL of a certificate whose request asks for none. Zero means
	// DefaultWorkloadTTL.
	DefaultTTL time.Duration
	// MaxTTL caps a requested lifetime (a longer request is clamped). Zero
	// means DefaultMaxWorkloadTTL.
	MaxTTL time.Duration
	// ServingDNSNames of the server's own TLS certificate (the discovery
	// Service's names). Required for ServingCertificate.
	ServingDNSNames []string
	// Now is the clock. Nil means time.Now.
	Now func() time.Time
	// Log receives one line per refused request and per certificate issued
	// (V(1)).
	Log logr.Logger
}

// Server implements Istio's certificate API,
// istio.v1.auth.IstioCertificateService, with the current Authority.
type Server struct {
	securityv1alpha1.UnimplementedIstioCertificateServiceServer

	opts ServerOptions
	ca   atomic.Pointer[Authority]

	servingMu sync.Mutex
	serving   atomic.Pointer[tls.Certificate]

	requests *prometheus.CounterVec
}

var _ securityv1alpha1.IstioCertificateServiceServer = (*Server)(nil)

// NewServer returns a Server signing with a.
func NewServer(a *Authority, opts ServerOptions) (*Server, error) {
	if a == nil {
		return nil, errors.New("ca: server needs an authority")
	}
	if opts.Authenticator == nil {
		return nil, errors.New("ca: server needs an authenticator")
	}
	if opts.DefaultTTL <= 0 {
		opts.DefaultTTL = DefaultWorkloadTTL
	}
	if opts.MaxTTL <= 0 {
		opts.MaxTTL = DefaultMaxWorkloadTTL
	}
	if opts.DefaultTTL > opts.MaxTTL {
		return nil, fmt.Errorf("ca: default certificate lifetime %s exceeds the maximum %s", opts.DefaultTTL, opts.MaxTTL)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Server{
		opts: opts,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_ca_certificate_requests_total",
			Help: "CreateCertificate requests by result (issued, unauthenticated, invalid, denied, error).",
		}, []string{"result"}),
	}
	s.ca.Store(a)
	return s, nil
}

// Collectors returns the server's Prometheus metrics for registration.
func (s *Server) Collectors() []prometheus.Collector { return []prometheus.Collector{s.requests} }

// SetAuthority switches signing to a (a reloaded CA); the serving
// certificate is re-issued by it on the next handshake.
func (s *Server) SetAuthority(a *Authority) {
	s.ca.Store(a)
	s.serving.Store(nil)
}

// Authority returns the authority in use.
func (s *Server) Authority() *Authority { return s.ca.Load() }

// CreateCertificate authenticates the caller by its bearer token, checks the
// CSR and returns a certificate chain (leaf first, root last) for the
// caller's identity.
func (s *Server) CreateCertificate(ctx context.Context, req *securityv1alpha1.IstioCertificateRequest) (*securityv1alpha1.IstioCertificateResponse, error) {
	chain, id, err := s.create(ctx, req)
	if err != nil {
		st, _ := status.FromError(err)
		s.requests.WithLabelValues(resultOf(st.Code())).Inc()
		s.opts.Log.Info("Refused certificate request", "code", st.Code().String(), "reason", st.Message())
		return nil, err
	}
	s.requests.WithLabelValues("issued").Inc()
	s.opts.Log.V(1).Info("Issued certificate", "identity", id.String(), "notAfter", chain[0].NotAfter.UTC().Format(time.RFC3339), "serial", chain[0].SerialNumber.Text(16))
	resp := &securityv1alpha1.IstioCertificateResponse{CertChain: make([]string, len(chain))}
	for i := range chain {
		resp.CertChain[i] = string(certs.EncodeCertificates(chain[i : i+1]))
	}
	return resp, nil
}

func resultOf(c codes.Code) string {
	switch c {
	case codes.Unauthenticated:
		return "unauthenticated"
	case codes.InvalidArgument:
		return "invalid"
	case codes.PermissionDenied:
		return "denied"
	default:
		return "error"
	}
}

func (s *Server) create(ctx context.Context, req *securityv1alpha1.IstioCertificateRequest) ([]*x509.Certificate, Identity, error) {
	token, err := bearerToken(ctx)
	if err != nil {
		return nil, Identity{}, status.Error(codes.Unauthenticated, err.Error())
	}
	id, err := s.opts.Authenticator.Authenticate(ctx, token)
	if err != nil {
		if errors.Is(err, ErrUnauthenticated) {
			return nil, Identity{}, status.Error(codes.Unauthenticated, err.Error())
		}
		return nil, Identity{}, status.Errorf(codes.Unavailable, "authenticating caller: %v", err)
	}
	ttl, err := s.lifetime(req.GetValidityDuration())
	if err != nil {
		return nil, id, status.Error(codes.InvalidArgument, err.Error())
	}
	csr, err := ParseCSR([]byte(req.GetCsr()), id)
	switch {
	case errors.Is(err, ErrForeignIdentity):
		return nil, id, status.Error(codes.PermissionDenied, err.Error())
	case err != nil:
		return nil, id, status.Error(codes.InvalidArgument, err.Error())
	}
	chain, err := s.ca.Load().Sign(csr, id, s.opts.Now(), ttl)
	if err != nil {
		return nil, id, status.Error(codes.Internal, err.Error())
	}
	return chain, id, nil
}

// lifetime turns a request's validity_duration (seconds; 0 means the default)
// into the lifetime to issue, clamped to MaxTTL.
func (s *Server) lifetime(seconds int64) (time.Duration, error) {
	switch {
	case seconds < 0:
		return 0, fmt.Errorf("validity_duration %d is negative", seconds)
	case seconds == 0:
		return s.opts.DefaultTTL, nil
	case seconds > int64(s.opts.MaxTTL/time.Second):
		return s.opts.MaxTTL, nil
	default:
		return time.Duration(seconds) * time.Second, nil
	}
}

// bearerToken reads "authorization: Bearer <token>" from the gRPC metadata.
func bearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return "", fmt.Errorf("%w: no authorization metadata (want \"Bearer <service-account token>\")", ErrUnauthenticated)
	}
	if len(vals) > 1 {
		return "", fmt.Errorf("%w: %d authorization values, want one", ErrUnauthenticated, len(vals))
	}
	scheme, token, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(token) == "" {
		return "", fmt.Errorf("%w: authorization metadata is not \"Bearer <token>\"", ErrUnauthenticated)
	}
	return strings.TrimSpace(token), nil
}

// ServingCertificate is tls.Config.GetCertificate for the server's own TLS
// listener: a certificate for ServingDNSNames signed by the current
// authority, kept in memory and re-issued at half its lifetime.
func (s *Server) ServingCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	now := s.opts.Now()
	if c := s.serving.Load(); c != nil && now.Before(halfLife(c)) {
		return c, nil
	}
	s.servingMu.Lock()
	defer s.servingMu.Unlock()
	if c := s.serving.Load(); c != nil && now.Before(halfLife(c)) {
		return c, nil
	}
	if len(s.opts.ServingDNSNames) == 0 {
		return nil, errors.New("ca: no DNS names for the serving certificate")
	}
	chain, key, err := s.ca.Load().IssueServing(s.opts.ServingDNSNames, now, s.opts.DefaultTTL)
	if err != nil {
		return nil, err
	}
	c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	s.serving.Store(c)
	return c, nil
}

func halfLife(c *tls.Certificate) time.Time {
	return c.Leaf.NotBefore.Add(c.Leaf.NotAfter.Sub(c.Leaf.NotBefore) / 2)
}
