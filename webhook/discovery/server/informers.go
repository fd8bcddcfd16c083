package server

import (
	"context"
	"fmt"
	"maps"
	"slices"

	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

func typesUID(s string) types.UID { return types.UID(s) }

// startInformers starts one shared informer factory per client, waits for
// their caches, and returns a function that lists one consistent-enough
// view (each lister's current state) as translation inputs.
func (s *Server) startInformers(ctx context.Context) (func() *translate.Inputs, error) {
	kf := informers.NewSharedInformerFactory(s.opts.Kube, s.opts.Resync)
	isf := istioinformers.NewSharedInformerFactory(s.opts.Istio, s.opts.Resync)
	svc := kf.Core().V1().Services()
	eps := kf.Discovery().V1().EndpointSlices()
	pods := kf.Core().V1().Pods()
	nss := kf.Core().V1().Namespaces()
	vs := isf.Networking().V1().VirtualServices()
	dr := isf.Networking().V1().DestinationRules()
	se := isf.Networking().V1().ServiceEntries()
	sc := isf.Networking().V1().Sidecars()
	ap := isf.Security().V1().AuthorizationPolicies()
	pa := isf.Security().V1().PeerAuthentications()
	onAny := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { s.changed() },
		UpdateFunc: func(any, any) { s.changed() },
		DeleteFunc: func(any) { s.changed() },
	}
	// A pod matters only through its labels and IPs; status churn is not a push.
	podHandler := cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { s.changed() },
		UpdateFunc: func(o, n any) {
			op, ok1 := o.(*corev1.Pod)
			np, ok2 := n.(*corev1.Pod)
			if !ok1 || !ok2 || !maps.Equal(op.Labels, np.Labels) || !slices.Equal(op.Status.PodIPs, np.Status.PodIPs) {
				s.changed()
			}
		},
		DeleteFunc: func(any) { s.changed() },
	}
	for _, inf := range []cache.SharedIndexInformer{svc.Informer(), eps.Informer(), nss.Informer(),
		vs.Informer(), dr.Informer(), se.Informer(), sc.Informer(), ap.Informer(), pa.Informer()} {
		if _, err := inf.AddEventHandler(onAny); err != nil {
			return nil, fmt.Errorf("adding event handler: %w", err)
		}
	}
	if _, err := pods.Informer().AddEventHandler(podHandler); err != nil {
		return nil, fmt.Errorf("adding event handler: %w", err)
	}
	kf.Start(ctx.Done())
	isf.Start(ctx.Done())
	for typ, ok := range kf.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return nil, fmt.Errorf("syncing the %v informer: %w", typ, ctx.Err())
		}
	}
	for typ, ok := range isf.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return nil, fmt.Errorf("syncing the %v informer (are Istio's CRDs installed?): %w", typ, ctx.Err())
		}
	}
	all := labels.Everything()
	return func() *translate.Inputs {
		in := &translate.Inputs{Domain: s.opts.Domain, RootNamespace: s.opts.RootNamespace, TrustDomain: s.opts.TrustDomain}
		in.Services, _ = svc.Lister().List(all)
		in.EndpointSlices, _ = eps.Lister().List(all)
		in.Pods, _ = pods.Lister().List(all)
		in.Namespaces, _ = nss.Lister().List(all)
		in.VirtualServices, _ = vs.Lister().List(all)
		in.DestinationRules, _ = dr.Lister().List(all)
		in.ServiceEntries, _ = se.Lister().List(all)
		in.Sidecars, _ = sc.Lister().List(all)
		in.Security.AuthorizationPolicies, _ = ap.Lister().List(all)
		in.Security.PeerAuthentications, _ = pa.Lister().List(all)
		return in
	}, nil
}
