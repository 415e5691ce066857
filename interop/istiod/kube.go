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
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/testing"

	"istio.io/istio/pkg/kube"
)

// objectLoader keeps the in-memory Kubernetes client's core objects equal to
// what a directory of YAML says: created, updated and deleted through the
// fake clientset's tracker, so informers see ordinary watch events.
type objectLoader struct {
	dir     string
	tracker testing.ObjectTracker
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
	l := &objectLoader{dir: dir, tracker: clientset.Tracker(), loaded: map[objectKey]loadedObject{}}
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
		var applyErr error
		if had {
			applyErr = l.tracker.Update(key.gvr, obj.object, key.namespace)
		} else {
			applyErr = l.tracker.Create(key.gvr, obj.object, key.namespace)
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
		if err := l.tracker.Delete(key.gvr, key.namespace, key.name); err != nil {
			return fmt.Errorf("delete %s %s/%s: %v", key.gvr.Resource, key.namespace, key.name, err)
		}
		delete(l.loaded, key)
	}
	return nil
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
	decode := scheme.Codecs.UniversalDeserializer().Decode
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
			obj, gvk, err := decode(doc, nil, nil)
			if err != nil {
				return nil, fmt.Errorf("%s: %v", file, err)
			}
			accessor, err := meta.Accessor(obj)
			if err != nil {
				return nil, fmt.Errorf("%s: %v", file, err)
			}
			gvr, _ := meta.UnsafeGuessKindToResource(*gvk)
			key := objectKey{gvr: gvr, namespace: accessor.GetNamespace(), name: accessor.GetName()}
			if _, dup := out[key]; dup {
				return nil, fmt.Errorf("%s: %s %s/%s is declared twice", file, gvk.Kind, key.namespace, key.name)
			}
			out[key] = parsedObject{object: obj, source: doc}
		}
	}
	return out, nil
}

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(b)) }
