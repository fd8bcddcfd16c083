package ca

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// Root ConfigMap published in every namespace (Istio's names).
const (
	RootConfigMapName = "istio-ca-root-cert"
	RootConfigMapKey  = "root-cert.pem"
)

// PublisherOptions configure a Publisher.
type PublisherOptions struct {
	// Client talks to the API server. Required.
	Client kubernetes.Interface
	// Resync is the informers' safety-net resync. Zero means 10 minutes.
	Resync time.Duration
	// Log receives what the publisher does.
	Log logr.Logger
}

// Publisher keeps the ConfigMap istio-ca-root-cert, holding the mesh's root
// certificates, in every namespace: a new namespace gets it, and an edited or
// deleted one is written back. It watches namespaces and those ConfigMaps
// (informers) and writes only what differs.
type Publisher struct {
	opts   PublisherOptions
	queue  workqueue.TypedRateLimitingInterface[string]
	nsList corelisters.NamespaceLister
	cmList corelisters.ConfigMapLister

	mu   sync.RWMutex
	root []byte
}

// NewPublisher returns a Publisher of root (PEM). Call Run to start it.
func NewPublisher(opts PublisherOptions, root []byte) (*Publisher, error) {
	if opts.Client == nil {
		return nil, errors.New("ca: publisher needs an API client")
	}
	if len(root) == 0 {
		return nil, errors.New("ca: publisher needs a root certificate")
	}
	if opts.Resync <= 0 {
		opts.Resync = 10 * time.Minute
	}
	return &Publisher{
		opts:  opts,
		root:  bytes.Clone(root),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](), workqueue.TypedRateLimitingQueueConfig[string]{Name: "istio-ca-root-cert"}),
	}, nil
}

// SetRoot changes the published root (a new CA) and rewrites every namespace's
// ConfigMap.
func (p *Publisher) SetRoot(root []byte) {
	p.mu.Lock()
	same := bytes.Equal(p.root, root)
	p.root = bytes.Clone(root)
	lister := p.nsList
	p.mu.Unlock()
	if same || lister == nil {
		return
	}
	nss, err := lister.List(labels.Everything())
	if err != nil {
		p.opts.Log.Error(err, "Listing namespaces from the cache")
		return
	}
	for _, ns := range nss {
		p.queue.Add(ns.Name)
	}
}

func (p *Publisher) currentRoot() []byte {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.root
}

// Run watches and publishes until ctx ends. It returns an error only if the
// caches cannot sync.
func (p *Publisher) Run(ctx context.Context) error {
	defer p.queue.ShutDown()
	nsFactory := informers.NewSharedInformerFactory(p.opts.Client, p.opts.Resync)
	cmFactory := informers.NewSharedInformerFactoryWithOptions(p.opts.Client, p.opts.Resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", RootConfigMapName).String()
		}))
	nsInf := nsFactory.Core().V1().Namespaces()
	cmInf := cmFactory.Core().V1().ConfigMaps()
	enqueueNS := func(obj any) {
		if ns, ok := obj.(*corev1.Namespace); ok {
			p.queue.Add(ns.Name)
		}
	}
	enqueueCM := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		if cm, ok := obj.(*corev1.ConfigMap); ok {
			p.queue.Add(cm.Namespace)
		}
	}
	if _, err := nsInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueueNS, UpdateFunc: func(_, n any) { enqueueNS(n) },
	}); err != nil {
		return fmt.Errorf("watching namespaces: %w", err)
	}
	if _, err := cmInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueueCM, UpdateFunc: func(_, n any) { enqueueCM(n) }, DeleteFunc: enqueueCM,
	}); err != nil {
		return fmt.Errorf("watching configmaps %s: %w", RootConfigMapName, err)
	}
	p.mu.Lock()
	p.nsList, p.cmList = nsInf.Lister(), cmInf.Lister()
	p.mu.Unlock()
	nsFactory.Start(ctx.Done())
	cmFactory.Start(ctx.Done())
	defer nsFactory.Shutdown()
	defer cmFactory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), nsInf.Informer().HasSynced, cmInf.Informer().HasSynced) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("ca: namespace and configmap caches did not sync")
	}
	go func() {
		<-ctx.Done()
		p.queue.ShutDown()
	}()
	for p.next(ctx) {
	}
	return nil
}

func (p *Publisher) next(ctx context.Context) bool {
	ns, quit := p.queue.Get()
	if quit {
		return false
	}
	defer p.queue.Done(ns)
	if err := p.publish(ctx, ns); err != nil {
		if ctx.Err() != nil {
			return false
		}
		p.opts.Log.Error(err, "Publishing the mesh root", "namespace", ns)
		p.queue.AddRateLimited(ns)
		return true
	}
	p.queue.Forget(ns)
	return true
}

// publish makes namespace ns hold the current root ConfigMap.
func (p *Publisher) publish(ctx context.Context, ns string) error {
	n, err := p.nsList.Get(ns)
	if apierrors.IsNotFound(err) || (err == nil && (n.DeletionTimestamp != nil || n.Status.Phase == corev1.NamespaceTerminating)) {
		return nil // gone or going: nothing can be created there
	}
	if err != nil {
		return fmt.Errorf("reading namespace %s from the cache: %w", ns, err)
	}
	root := p.currentRoot()
	api := p.opts.Client.CoreV1().ConfigMaps(ns)
	cur, err := p.cmList.ConfigMaps(ns).Get(RootConfigMapName)
	if apierrors.IsNotFound(err) {
		_, err := api.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: RootConfigMapName, Namespace: ns, Labels: rootLabels()},
			Data:       map[string]string{RootConfigMapKey: string(root)},
		}, metav1.CreateOptions{})
		switch {
		case err == nil:
			p.opts.Log.V(1).Info("Published the mesh root", "namespace", ns)
			return nil
		case apierrors.IsAlreadyExists(err):
			// Our cache is behind (another replica, or a user, was first):
			// the informer's event for it brings the namespace back.
			return nil
		case apierrors.IsForbidden(err) && apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause):
			return nil
		default:
			return fmt.Errorf("creating configmap %s/%s: %w", ns, RootConfigMapName, err)
		}
	}
	if err != nil {
		return fmt.Errorf("reading configmap %s/%s from the cache: %w", ns, RootConfigMapName, err)
	}
	if len(cur.Data) == 1 && cur.Data[RootConfigMapKey] == string(root) && len(cur.BinaryData) == 0 {
		return nil
	}
	next := cur.DeepCopy()
	next.Data = map[string]string{RootConfigMapKey: string(root)}
	next.BinaryData = nil
	if next.Labels == nil {
		next.Labels = map[string]string{}
	}
	for k, v := range rootLabels() {
		next.Labels[k] = v
	}
	if _, err := api.Update(ctx, next, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
			// Changed or deleted meanwhile: its event requeues the namespace.
			return nil
		}
		return fmt.Errorf("updating configmap %s/%s: %w", ns, RootConfigMapName, err)
	}
	p.opts.Log.Info("Restored the mesh root configmap", "namespace", ns)
	return nil
}

func rootLabels() map[string]string {
	return map[string]string{"istio.io/config": "true", "app.kubernetes.io/managed-by": "meshlet"}
}
