package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/testing"
	gatewayapifake "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned/fake"

	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/schema/gvk"
	"istio.io/istio/pkg/config/schema/gvr"
	"istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/kube/kclient/clienttest"
)

// gatewayAPIGroup is the API group of the Gateway API kinds the loader takes
// (a waypoint is a Gateway of class istio-waypoint, with its GatewayClass).
const gatewayAPIGroup = "gateway.networking.k8s.io"

// gatewayAPICRDs are declared in the in-memory client before istiod starts, as
// a cluster with the Gateway API installed has them: istiod's informers for
// these kinds wait for their CRD.
var gatewayAPICRDs = []schema.GroupVersionResource{gvr.KubernetesGateway, gvr.GatewayClass}

// objectLoader keeps the in-memory Kubernetes client's objects equal to what a
// directory of YAML says: created, updated and deleted through the fake
// clientsets' trackers (core kinds in the Kubernetes one, Gateway API kinds in
// the Gateway API one), so informers see ordinary watch events.
type objectLoader struct {
	dir      string
	trackers map[string]testing.ObjectTracker
	// loaded maps an object's key to its YAML as last applied.
	loaded map[objectKey]loadedObject
}

type objectKey struct {
	gvr       schema.GroupVersionResource
	namespace string
	name      string
}

type loadedObject struct {
	source []byte
}

func newObjectLoader(client kube.Client, dir string) (*objectLoader, error) {
	if dir == "" {
		return nil, nil
	}
	clientset, ok := client.Kube().(*fake.Clientset)
	if !ok {
		return nil, fmt.Errorf("the in-memory client's clientset is %T, not *fake.Clientset", client.Kube())
	}
	gateways, ok := client.GatewayAPI().(*gatewayapifake.Clientset)
	if !ok {
		return nil, fmt.Errorf("the in-memory client's Gateway API clientset is %T, not a fake", client.GatewayAPI())
	}
	for _, crd := range gatewayAPICRDs {
		if err := makeCRD(client, crd); err != nil {
			return nil, err
		}
	}
	l := &objectLoader{
		dir: dir,
		trackers: map[string]testing.ObjectTracker{
			"":              clientset.Tracker(),
			gatewayAPIGroup: gateways.Tracker(),
		},
		loaded: map[objectKey]loadedObject{},
	}
	if err := l.sync(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *objectLoader) watch(stop <-chan struct{}) {
	ticker := time.NewTicker(100 * time.Millisecond)
	defer ticker.Stop()
	for {
		select {
		case <-stop:
			return
		case <-ticker.C:
			if err := l.sync(); err != nil {
				fmt.Fprintf(os.Stderr, "istiod harness: kube objects: %v\n", err)
			}
		}
	}
}

// sync reads every .yaml/.yml/.json file under dir and applies the difference
// from what was loaded before. A file that does not parse leaves everything
// as it was, and is reported.
func (l *objectLoader) sync() error {
	want, err := l.read()
	if err != nil {
		return err
	}
	for key, obj := range want {
		old, had := l.loaded[key]
		if had && bytes.Equal(old.source, obj.source) {
			continue
		}
		tracker := l.tracker(key.gvr)
		var applyErr error
		if had {
			applyErr = tracker.Update(key.gvr, obj.object, key.namespace)
		} else {
			applyErr = tracker.Create(key.gvr, obj.object, key.namespace)
		}
		if applyErr != nil {
			return fmt.Errorf("%s %s/%s: %v", key.gvr.Resource, key.namespace, key.name, applyErr)
		}
		l.loaded[key] = loadedObject{source: obj.source}
	}
	for key := range l.loaded {
		if _, keep := want[key]; keep {
			continue
		}
		if err := l.tracker(key.gvr).Delete(key.gvr, key.namespace, key.name); err != nil {
			return fmt.Errorf("delete %s %s/%s: %v", key.gvr.Resource, key.namespace, key.name, err)
		}
		delete(l.loaded, key)
	}
	return nil
}

// tracker is the fake clientset that holds objects of gvr's group.
func (l *objectLoader) tracker(gvr schema.GroupVersionResource) testing.ObjectTracker {
	if t, ok := l.trackers[gvr.Group]; ok {
		return t
	}
	return l.trackers[""]
}

type parsedObject struct {
	object runtime.Object
	source []byte
}

func (l *objectLoader) read() (map[objectKey]parsedObject, error) {
	var files []string
	err := filepath.WalkDir(l.dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		ext := filepath.Ext(path)
		if !d.IsDir() && (ext == ".yaml" || ext == ".yml" || ext == ".json") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(files)
	out := map[objectKey]parsedObject{}
	// Istio's scheme: the core kinds and the Gateway API ones.
	decode := kube.IstioCodec.UniversalDeserializer().Decode
	for _, file := range files {
		content, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		reader := yaml.NewYAMLReader(bufioReader(content))
		for {
			doc, err := reader.Read()
			if err != nil {
				break
			}
			if len(strings.TrimSpace(string(doc))) == 0 {
				continue
			}
			obj, kind, err := decode(doc, nil, nil)
			if err != nil {
				return nil, fmt.Errorf("%s: %v", file, err)
			}
			accessor, err := meta.Accessor(obj)
			if err != nil {
				return nil, fmt.Errorf("%s: %v", file, err)
			}
			if strings.HasSuffix(kind.Group, "istio.io") {
				return nil, fmt.Errorf("%s: %s of group %s: Istio kinds belong in the config directory", file, kind.Kind, kind.Group)
			}
			resource := resourceOf(*kind)
			key := objectKey{gvr: resource, namespace: accessor.GetNamespace(), name: accessor.GetName()}
			if _, dup := out[key]; dup {
				return nil, fmt.Errorf("%s: %s %s/%s is declared twice", file, kind.Kind, key.namespace, key.name)
			}
			out[key] = parsedObject{object: obj, source: doc}
		}
	}
	return out, nil
}

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(b)) }

// resourceOf is the resource of a kind as istio names it (guessing from the
// kind alone makes "gatewaies" of Gateway).
func resourceOf(kind schema.GroupVersionKind) schema.GroupVersionResource {
	if r, ok := gvk.ToGVR(config.FromKubernetesGVK(kind)); ok {
		if r.Group == "core" {
			r.Group = ""
		}
		return r
	}
	r, _ := meta.UnsafeGuessKindToResource(kind)
	return r
}

// makeCRD declares resource's CRD in the in-memory client, as istio's own tests do.
func makeCRD(client kube.Client, resource schema.GroupVersionResource) (err error) {
	f := &failer{}
	defer func() {
		if r := recover(); r != nil && r != errFailed {
			panic(r)
		}
		if f.failed {
			err = fmt.Errorf("declaring the CRD of %s: %s", resource, strings.Join(f.logs, "; "))
		}
	}()
	clienttest.MakeCRD(f, client, resource)
	return nil
}

var errFailed = fmt.Errorf("failed")

// failer is the test.Failer clienttest.MakeCRD reports to: it records, and a
// fatal report ends the call.
type failer struct {
	failed bool
	logs   []string
}

func (f *failer) Fail()                             { f.failed = true }
func (f *failer) FailNow()                          { f.failed = true; panic(errFailed) }
func (f *failer) Fatal(args ...any)                 { f.Log(args...); f.FailNow() }
func (f *failer) Fatalf(format string, args ...any) { f.Logf(format, args...); f.FailNow() }
func (f *failer) Log(args ...any)                   { f.logs = append(f.logs, fmt.Sprint(args...)) }
func (f *failer) Logf(format string, args ...any) {
	f.logs = append(f.logs, fmt.Sprintf(format, args...))
}
func (f *failer) TempDir() string  { d, _ := os.MkdirTemp("", "istiod-harness"); return d }
func (f *failer) Helper()          {}
func (f *failer) Cleanup(func())   {}
func (f *failer) Skip(args ...any) { f.Log(args...); f.FailNow() }
