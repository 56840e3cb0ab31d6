package controllers

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/go-logr/logr"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/stickylb/stickylb/dataplane/proxy"
)

func TestReadinessCheck(t *testing.T) {
	d := NewDataplane(nil, nil, netip.Addr{}, logr.Discard())
	r := NewReadiness(d)
	if err := r.Check(nil); !errors.Is(err, errNotServing) {
		t.Errorf("before the first snapshot: %v, want %v", err, errNotServing)
	}
	d.serving.Store(true)
	if err := r.Check(nil); err != nil {
		t.Errorf("serving: %v, want ready", err)
	}
	r.Stop()
	if err := r.Check(nil); !errors.Is(err, errShuttingDown) {
		t.Errorf("after Stop: %v, want %v", err, errShuttingDown)
	}
}

// TestReadinessWaitsForTheFirstSnapshot runs a second dataplane, in a
// manager of its own that sees one empty namespace: no object ever changes,
// and it must still become ready once its caches have synced and it has
// applied its (empty) snapshot.
func TestReadinessWaitsForTheFirstSnapshot(t *testing.T) {
	ns := namespace(t)
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme: testScheme, Metrics: metricsserver.Options{BindAddress: "0"},
		Cache: cache.Options{DefaultNamespaces: map[string]cache.Config{ns: {}}},
		// The suite's manager already runs a controller named "dataplane".
		Controller: config.Controller{SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	p, err := proxy.New(proxy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d := NewDataplane(mgr.GetClient(), p, netip.MustParseAddr("127.0.0.2"), logr.Discard())
	r := NewReadiness(d)
	if err := d.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	if err := r.Check(nil); err == nil {
		t.Fatal("ready before the manager started")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		sctx, scancel := context.WithTimeout(context.Background(), time.Second)
		defer scancel()
		_ = p.Shutdown(sctx)
	})
	deadline := time.Now().Add(20 * time.Second)
	for r.Check(nil) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("not ready within 20s: %v", r.Check(nil))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if p.Version() == 0 {
		t.Error("ready, but the proxy has applied no snapshot")
	}
	r.Stop()
	if err := r.Check(nil); !errors.Is(err, errShuttingDown) {
		t.Errorf("after Stop: %v, want %v", err, errShuttingDown)
	}
}

// frontendSlice creates a frontend-labelled EndpointSlice (or, with
// frontend "", an ordinary one) and waits until the manager's cache has it.
func frontendSlice(t *testing.T, ns, name, frontend string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	t.Helper()
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
	}
	if frontend != "" {
		s.Labels[LabelFrontend] = frontend
	}
	if err := k8s.Create(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	waitCached(t, s, func(got *discoveryv1.EndpointSlice) bool { return got.ResourceVersion == s.ResourceVersion })
	return s
}

// waitCached waits until the manager's cache (which WaitUntilUnlisted reads) passes check.
func waitCached(t *testing.T, s *discoveryv1.EndpointSlice, check func(*discoveryv1.EndpointSlice) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var got discoveryv1.EndpointSlice
		err := dataplane.Client.Get(context.Background(), client.ObjectKeyFromObject(s), &got)
		if err == nil && check(&got) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cache never saw the change to slice %s (err %v)", s.Name, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ep(addr string, ready *bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ready}}
}

func updateSlice(t *testing.T, s *discoveryv1.EndpointSlice, eps ...discoveryv1.Endpoint) {
	t.Helper()
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var cur discoveryv1.EndpointSlice
		if err := k8s.Get(context.Background(), client.ObjectKeyFromObject(s), &cur); err != nil {
			return err
		}
		cur.Endpoints = eps
		return k8s.Update(context.Background(), &cur)
	}); err != nil {
		t.Fatal(err)
	}
}

func TestWaitUntilUnlisted(t *testing.T) {
	ns := namespace(t)
	other := "10.3.0.250"
	for i, tc := range []struct {
		name string
		// change takes the replica's address out of s.
		change func(t *testing.T, s *discoveryv1.EndpointSlice, me string)
	}{
		{"address removed", func(t *testing.T, s *discoveryv1.EndpointSlice, _ string) {
			updateSlice(t, s, ep(other, ptr.To(true)))
		}},
		{"endpoint no longer ready", func(t *testing.T, s *discoveryv1.EndpointSlice, me string) {
			updateSlice(t, s, ep(other, ptr.To(true)), ep(me, ptr.To(false)))
		}},
		{"slice deleted", func(t *testing.T, s *discoveryv1.EndpointSlice, _ string) {
			if err := k8s.Delete(context.Background(), s); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			me := fmt.Sprintf("10.3.0.%d", i+1)
			// An absent ready condition means ready.
			s := frontendSlice(t, ns, fmt.Sprintf("frontend-%d", i), "public", ep(other, ptr.To(true)), ep(me, nil))
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			type result struct {
				listedIn []string
				err      error
				at       time.Time
			}
			done := make(chan result, 1)
			go func() {
				l, err := WaitUntilUnlisted(ctx, dataplane.Client, netip.MustParseAddr(me))
				done <- result{l, err, time.Now()}
			}()
			select {
			case r := <-done:
				t.Fatalf("returned (%v, %v) while the frontend lists the address", r.listedIn, r.err)
			case <-time.After(500 * time.Millisecond):
			}
			changed := time.Now()
			tc.change(t, s, me)
			select {
			case r := <-done:
				if r.err != nil || len(r.listedIn) != 0 {
					t.Errorf("returned (%v, %v), want (nil, nil)", r.listedIn, r.err)
				}
				if r.at.Before(changed) {
					t.Error("returned before the change")
				}
			case <-time.After(10 * time.Second):
				t.Fatal("still waiting 10s after the address left the frontend")
			}
		})
	}

	t.Run("not listed at all", func(t *testing.T) {
		me := "10.3.0.100"
		// An EndpointSlice that is no frontend's does not count.
		frontendSlice(t, ns, "backend", "", ep(me, ptr.To(true)))
		frontendSlice(t, ns, "frontend-others", "public", ep(other, ptr.To(true)))
		start := time.Now()
		l, err := WaitUntilUnlisted(context.Background(), dataplane.Client, netip.MustParseAddr(me))
		if err != nil || len(l) != 0 || time.Since(start) > time.Second {
			t.Errorf("returned (%v, %v) after %v, want (nil, nil) at once", l, err, time.Since(start))
		}
	})

	t.Run("timeout", func(t *testing.T) {
		me := "10.3.0.101"
		frontendSlice(t, ns, "frontend-a", "a", ep(me, ptr.To(true)))
		frontendSlice(t, ns, "frontend-b", "b", ep(other, ptr.To(true)), ep(me, ptr.To(true)))
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start := time.Now()
		l, err := WaitUntilUnlisted(ctx, dataplane.Client, netip.MustParseAddr(me))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("err = %v, want the deadline", err)
		}
		if want := []string{ns + "/frontend-a", ns + "/frontend-b"}; !slices.Equal(l, want) {
			t.Errorf("listedIn = %v, want %v", l, want)
		}
		if took := time.Since(start); took < 900*time.Millisecond || took > 3*time.Second {
			t.Errorf("returned after %v, want about 1s", took)
		}
	})
}
