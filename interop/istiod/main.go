// Command istiod runs Istio's real control-plane server (pilot/pkg/bootstrap,
// unpatched) on loopback, without a Kubernetes API, as a test peer for strait.
//
// Istio configuration is read from a directory of YAML (watched, hot reload).
// The CA is plugged from a directory (ca-cert.pem, ca-key.pem, root-cert.pem,
// cert-chain.pem), so the root survives restarts. Kubernetes objects
// (Namespaces, Services, Pods, EndpointSlices, ...) may be loaded from a second
// directory into the in-memory Kubernetes client, with the Kubernetes registry
// on; that directory is watched too.
//
// When every listener is serving and istiod's readiness probe answers, one
// line is written to standard output:
//
//	READY {"grpc":"127.0.0.1:15010","secureGrpc":"127.0.0.1:15012",...}
//
// istiod's log goes to standard error. SIGTERM or SIGINT stops it.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"syscall"
	"time"
	"unsafe"

	"istio.io/istio/pilot/pkg/bootstrap"
	"istio.io/istio/pkg/cluster"
	"istio.io/istio/pkg/cmd"
	"istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/log"
)

// childMarker is set in the environment of the re-executed process: istio
// reads its feature flags in package initialisers, so everything the flags
// say about the environment must be in place before the process starts.
const childMarker = "STRAIT_ISTIOD_HARNESS_CHILD"

const defaultMesh = `trustDomain: cluster.local
rootNamespace: istio-system
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
  meshId: mesh1
defaultProviders:
  metrics: [prometheus]
`

type options struct {
	configDir  string
	kubeDir    string
	caDir      string
	meshFile   string
	clusterID  string
	grpc       string
	secureGrpc string
	http       string
	monitoring string
	debounce   string
	jwtRule    string
}

func main() {
	var o options
	flag.StringVar(&o.configDir, "config-dir", "", "directory of Istio YAML (required; watched)")
	flag.StringVar(&o.kubeDir, "kube-dir", "", "directory of Kubernetes YAML loaded into the in-memory client; turns the Kubernetes registry on (watched)")
	flag.StringVar(&o.caDir, "ca-dir", "", "plugged CA: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem (required)")
	flag.StringVar(&o.meshFile, "mesh", "", "mesh config file (default: a Helm install's essentials, with the prometheus metrics provider)")
	flag.StringVar(&o.clusterID, "cluster", "cluster1", "istiod's cluster id")
	flag.StringVar(&o.grpc, "grpc", "127.0.0.1:15010", "plaintext xDS address")
	flag.StringVar(&o.secureGrpc, "secure-grpc", "127.0.0.1:15012", "TLS xDS and CA address")
	flag.StringVar(&o.http, "http", "127.0.0.1:8080", "readiness and debug address")
	flag.StringVar(&o.monitoring, "monitoring", "127.0.0.1:15014", "monitoring and /debug address")
	flag.StringVar(&o.debounce, "debounce", "", "PILOT_DEBOUNCE_AFTER (istiod's default when empty)")
	flag.StringVar(&o.jwtRule, "jwt-rule", "", "JWT_RULE: issuer, jwks_uri and audiences of projected tokens")
	flag.Parse()
	if o.configDir == "" || o.caDir == "" {
		fmt.Fprintln(os.Stderr, "istiod harness: -config-dir and -ca-dir are required")
		os.Exit(2)
	}
	if os.Getenv(childMarker) == "" {
		reexec(o)
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "istiod harness: %v\n", err)
		os.Exit(1)
	}
}

// reexec replaces this process with itself, the environment istio reads at
// start set from the flags. The PID stays the same, so a caller's SIGTERM
// reaches the server.
func reexec(o options) {
	env := map[string]string{
		childMarker:                      "1",
		"ROOT_CA_DIR":                    abs(o.caDir),
		"POD_NAME":                       "istiod-local",
		"POD_NAMESPACE":                  "istio-system",
		"PILOT_ENABLE_IP_AUTOALLOCATE":   "false",
		"VALIDATION_WEBHOOK_CONFIG_NAME": "",
		"INJECT_ENABLED":                 "false",
		"CLUSTER_ID":                     o.clusterID,
		"JWT_RULE":                       o.jwtRule,
	}
	if o.debounce != "" {
		env["PILOT_DEBOUNCE_AFTER"] = o.debounce
	}
	for k, v := range env {
		if err := os.Setenv(k, v); err != nil {
			fmt.Fprintf(os.Stderr, "istiod harness: setenv %s: %v\n", k, err)
			os.Exit(1)
		}
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "istiod harness: %v\n", err)
		os.Exit(1)
	}
	err = syscall.Exec(self, os.Args, os.Environ())
	fmt.Fprintf(os.Stderr, "istiod harness: exec %s: %v\n", self, err)
	os.Exit(1)
}

func abs(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}

func run(o options) error {
	// istiod logs to standard error here: standard output carries the READY line.
	logging := log.DefaultOptions()
	logging.OutputPaths = []string{"stderr"}
	if err := log.Configure(logging); err != nil {
		return err
	}
	meshFile := o.meshFile
	if meshFile == "" {
		f, err := os.CreateTemp("", "istiod-mesh-*.yaml")
		if err != nil {
			return err
		}
		defer os.Remove(f.Name())
		if _, err := f.WriteString(defaultMesh); err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		meshFile = f.Name()
	}

	args := bootstrap.NewPilotArgs(func(p *bootstrap.PilotArgs) {
		p.Namespace = "istio-system"
		p.CniNamespace = "istio-system"
		p.PodName = "istiod-local"
		p.MeshConfigFile = meshFile
		p.NetworksConfigFile = filepath.Join(os.TempDir(), "istiod-harness-no-mesh-networks")
		p.ShutdownDuration = time.Second
		p.ServerOptions = bootstrap.DiscoveryServerOptions{
			HTTPAddr:       o.http,
			HTTPSAddr:      "",
			GRPCAddr:       o.grpc,
			SecureGRPCAddr: o.secureGrpc,
			MonitoringAddr: o.monitoring,
			TLSOptions:     bootstrap.TLSOptions{TLSMinVersion: bootstrap.TLSMinVersion1_2},
		}
		p.RegistryOptions.FileDir = o.configDir
		p.RegistryOptions.Registries = nil
		p.RegistryOptions.KubeOptions.ClusterID = cluster.ID(o.clusterID)
		p.RegistryOptions.KubeOptions.DomainSuffix = "cluster.local"
		p.RegistryOptions.KubeOptions.KubernetesAPIQPS = 80
		p.RegistryOptions.KubeOptions.KubernetesAPIBurst = 160
		p.JwtRule = o.jwtRule
		if o.kubeDir != "" {
			p.RegistryOptions.Registries = []string{"Kubernetes"}
		}
	})
	if err := args.Complete(); err != nil {
		return err
	}

	client := kube.NewFakeClient()
	objects, err := newObjectLoader(client, o.kubeDir)
	if err != nil {
		return err
	}
	server, err := bootstrap.NewServer(args, func(s *bootstrap.Server) {
		setKubeClient(s, client)
	})
	if err != nil {
		return fmt.Errorf("bootstrap.NewServer: %v", err)
	}
	stop := make(chan struct{})
	if err := server.Start(stop); err != nil {
		return fmt.Errorf("start: %v", err)
	}
	if objects != nil {
		go objects.watch(stop)
	}
	if err := awaitReady(o); err != nil {
		return err
	}
	ready, err := json.Marshal(map[string]string{
		"grpc":       o.grpc,
		"secureGrpc": o.secureGrpc,
		"http":       o.http,
		"monitoring": o.monitoring,
		"cluster":    o.clusterID,
	})
	if err != nil {
		return err
	}
	fmt.Printf("READY %s\n", ready)

	cmd.WaitSignal(stop)
	server.WaitUntilCompletion()
	return nil
}

// setKubeClient puts the in-memory client into the server's unexported
// kubeClient field before initKubeClient runs, as istio's own bootstrap tests
// do from inside the package. A renamed or retyped field stops the harness
// here rather than letting it start against a real API.
func setKubeClient(s *bootstrap.Server, client kube.Client) {
	field := reflect.ValueOf(s).Elem().FieldByName("kubeClient")
	if !field.IsValid() {
		panic("bootstrap.Server has no field kubeClient: this istio version needs the harness updated")
	}
	if !reflect.TypeOf(client).AssignableTo(field.Type()) {
		panic(fmt.Sprintf("bootstrap.Server.kubeClient is %s, not assignable from %T", field.Type(), client))
	}
	reflect.NewAt(field.Type(), unsafe.Pointer(field.UnsafeAddr())).Elem().Set(reflect.ValueOf(client))
}

// awaitReady polls istiod's own readiness probe (every readiness check
// istiod registers) and then checks the xDS ports accept connections.
func awaitReady(o options) error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get("http://" + o.http + "/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("istiod was not ready within 60s (GET http://%s/ready)", o.http)
}
