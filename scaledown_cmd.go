package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

// runScaleDown is `stickylb scale-down`, the chart's pre-delete hook: it
// scales the manager Deployment to zero and waits until its pods are gone.
//
// helm uninstall deletes the Deployment and the RBAC together, so replicas
// that stop afterwards can no longer write: the frontends' EndpointSlices
// would go on listing pods that no longer exist, and clients would time out
// instead of being refused. Scaled down first, the replicas leave the
// frontends as on any rollout (the leader empties the slices while it still
// may), and only then does Helm delete the rest.
func runScaleDown(args []string) int {
	fs := flag.NewFlagSet("stickylb scale-down", flag.ContinueOnError)
	deployment := fs.String("deployment", "", "the manager Deployment (required)")
	namespace := fs.String("namespace", os.Getenv("POD_NAMESPACE"), "its namespace (default: $POD_NAMESPACE)")
	selector := fs.String("selector", "", "label selector of its pods (required)")
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for the pods to be gone; past it the uninstall goes on")
	zo := zap.Options{}
	zo.BindFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: stickylb scale-down --deployment NAME --selector LABELS [flags]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zo)))
	log := ctrl.Log.WithName("scale-down")
	if *deployment == "" || *namespace == "" || *selector == "" {
		log.Error(errors.New("--deployment, --namespace and --selector are required"), "bad flags")
		return 2
	}
	sel, err := labels.Parse(*selector)
	if err != nil {
		log.Error(err, "--selector")
		return 2
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		log.Error(err, "no Kubernetes configuration")
		return 1
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		log.Error(err, "client")
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if err := scaleDown(ctx, log, cs, *namespace, *deployment, sel); err != nil {
		// The uninstall must not hang on us: say what is left and let it go on.
		log.Error(err, "scale-down incomplete; the uninstall goes on")
	}
	return 0
}

func scaleDown(ctx context.Context, log logr.Logger, cs kubernetes.Interface, namespace, name string, sel labels.Selector) error {
	start := time.Now()
	deployments := cs.AppsV1().Deployments(namespace)
	scale, err := deployments.GetScale(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		log.Info("no Deployment to scale down", "deployment", name)
		return nil
	}
	if err != nil {
		return fmt.Errorf("get the scale of %s/%s: %w", namespace, name, err)
	}
	if scale.Spec.Replicas != 0 {
		scale.Spec.Replicas = 0
		if _, err := deployments.UpdateScale(ctx, name, scale, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("scale %s/%s to 0: %w", namespace, name, err)
		}
	}
	log.Info("scaled to 0; waiting for the replicas to leave the frontends and stop", "deployment", name)
	for {
		pods, err := cs.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
		if err == nil && len(pods.Items) == 0 {
			log.Info("every replica is gone", "took", time.Since(start).Round(time.Millisecond).String())
			return nil
		}
		select {
		case <-ctx.Done():
			left := -1
			if pods != nil {
				left = len(pods.Items)
			}
			return fmt.Errorf("%d pods still there after %v: %w", left, time.Since(start).Round(time.Second), errors.Join(err, ctx.Err()))
		case <-time.After(500 * time.Millisecond):
		}
	}
}
