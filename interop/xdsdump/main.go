// Command xdsdump connects to an xDS server's plaintext ADS endpoint (istiod's
// 15010) as one node, subscribes as Envoy does (every listener and cluster,
// then the load assignments of the EDS clusters and the route configurations
// the listeners name), ACKs every response, and once the answers have settled
// prints everything it was sent as one JSON object on standard output:
//
//	{"listeners":[...],"clusters":[...],"endpoints":[...],"routes":[...]}
//
// Each resource is Envoy's own JSON form (protojson, typed_config expanded).
// A stream error (a refused node, a bad metadata type) is written to standard
// error with exit status 1.
//
//	xdsdump -xds 127.0.0.1:15010 -node waypoint~10.0.0.5~ew-0.istio-system~istio-system.svc.cluster.local \
//	        -meta '{"NAMESPACE":"istio-system","LABELS":{...}}'
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	// Every type istiod may put in a typed_config, for protojson: Envoy's
	// extensions and the TypedStructs of Istio's own filters.
	_ "github.com/cncf/xds/go/udpa/type/v1"
	_ "github.com/cncf/xds/go/xds/type/v3"
	_ "istio.io/istio/pkg/config/xds"
)

const (
	typeListener = "type.googleapis.com/envoy.config.listener.v3.Listener"
	typeCluster  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	typeEndpoint = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	typeRoute    = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
)

func main() {
	addr := flag.String("xds", "127.0.0.1:15010", "plaintext ADS address")
	node := flag.String("node", "", "node id (required)")
	meta := flag.String("meta", "{}", "node metadata, a JSON object")
	settle := flag.Duration("settle", time.Second, "how long the answers must stay unchanged")
	timeout := flag.Duration("timeout", 30*time.Second, "give up after this long")
	flag.Parse()
	if *node == "" {
		fmt.Fprintln(os.Stderr, "xdsdump: -node is required")
		os.Exit(2)
	}
	out, err := dump(*addr, *node, *meta, *settle, *timeout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "xdsdump: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}

type state struct {
	// Per type URL, resource name -> resource (state of the world for LDS and
	// CDS; EDS and RDS answers may carry a part only, so they are merged).
	resources map[string]map[string]*anypb.Any
	// Names subscribed per type (EDS, RDS).
	subscribed map[string][]string
	answered   map[string]bool
}

func dump(addr, node, meta string, settle, timeout time.Duration) ([]byte, error) {
	var metadata structpb.Struct
	if err := protojson.Unmarshal([]byte(meta), &metadata); err != nil {
		return nil, fmt.Errorf("-meta: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return nil, err
	}
	n := &core.Node{Id: node, Metadata: &metadata}
	s := &state{
		resources:  map[string]map[string]*anypb.Any{},
		subscribed: map[string][]string{},
		answered:   map[string]bool{},
	}
	for _, t := range []string{typeCluster, typeListener} {
		if err := stream.Send(&discovery.DiscoveryRequest{Node: n, TypeUrl: t}); err != nil {
			return nil, err
		}
	}

	type received struct {
		resp *discovery.DiscoveryResponse
		err  error
	}
	ch := make(chan received, 16)
	go func() {
		for {
			resp, err := stream.Recv()
			ch <- received{resp, err}
			if err != nil {
				return
			}
		}
	}()
	quiet := time.NewTimer(timeout)
	for {
		select {
		case r := <-ch:
			if r.err != nil {
				return nil, fmt.Errorf("stream: %v", r.err)
			}
			if err := s.take(r.resp); err != nil {
				return nil, err
			}
			// ACK with the names subscribed for this type.
			if err := stream.Send(&discovery.DiscoveryRequest{
				TypeUrl:       r.resp.TypeUrl,
				VersionInfo:   r.resp.VersionInfo,
				ResponseNonce: r.resp.Nonce,
				ResourceNames: s.subscribed[r.resp.TypeUrl],
			}); err != nil {
				return nil, err
			}
			// Subscribe to what the listeners and clusters name, as Envoy does.
			for t, names := range map[string][]string{typeEndpoint: s.edsNames(), typeRoute: s.rdsNames()} {
				if equal(names, s.subscribed[t]) {
					continue
				}
				s.subscribed[t] = names
				s.answered[t] = false
				if err := stream.Send(&discovery.DiscoveryRequest{TypeUrl: t, ResourceNames: names}); err != nil {
					return nil, err
				}
			}
			quiet.Reset(settle)
		case <-quiet.C:
			if !s.complete() {
				return nil, errors.New("no complete answer (listeners, clusters, and what they name) before the timeout")
			}
			return s.json()
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (s *state) take(resp *discovery.DiscoveryResponse) error {
	t := resp.TypeUrl
	byName := s.resources[t]
	if byName == nil || t == typeListener || t == typeCluster {
		byName = map[string]*anypb.Any{}
		s.resources[t] = byName
	}
	for _, r := range resp.Resources {
		name, err := resourceName(r)
		if err != nil {
			return err
		}
		byName[name] = r
	}
	s.answered[t] = true
	return nil
}

func resourceName(r *anypb.Any) (string, error) {
	m, err := r.UnmarshalNew()
	if err != nil {
		return "", fmt.Errorf("%s: %v", r.TypeUrl, err)
	}
	named, ok := m.(interface{ GetName() string })
	if ok {
		return named.GetName(), nil
	}
	if cla, ok := m.(interface{ GetClusterName() string }); ok {
		return cla.GetClusterName(), nil
	}
	return "", fmt.Errorf("%s has no name", r.TypeUrl)
}

// complete: listeners and clusters arrived, and so did an answer for every
// type subscribed by name.
func (s *state) complete() bool {
	for _, t := range []string{typeListener, typeCluster, typeEndpoint, typeRoute} {
		byName := t == typeEndpoint || t == typeRoute
		if !s.answered[t] && !(byName && len(s.subscribed[t]) == 0) {
			return false
		}
	}
	return true
}

// edsNames are the clusters whose endpoints come over EDS.
func (s *state) edsNames() []string {
	var names []string
	for name, r := range s.resources[typeCluster] {
		var c cluster.Cluster
		if r.UnmarshalTo(&c) == nil && c.GetType() == cluster.Cluster_EDS {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}

// rdsNames are the route configurations the listeners' HTTP connection managers name.
func (s *state) rdsNames() []string {
	seen := map[string]bool{}
	for _, r := range s.resources[typeListener] {
		var l listener.Listener
		if r.UnmarshalTo(&l) != nil {
			continue
		}
		chains := l.GetFilterChains()
		if l.GetDefaultFilterChain() != nil {
			chains = append(chains, l.GetDefaultFilterChain())
		}
		for _, fc := range chains {
			for _, f := range fc.GetFilters() {
				var h hcm.HttpConnectionManager
				if f.GetTypedConfig().UnmarshalTo(&h) == nil && h.GetRds().GetRouteConfigName() != "" {
					seen[h.GetRds().GetRouteConfigName()] = true
				}
			}
		}
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func (s *state) json() ([]byte, error) {
	out := map[string][]json.RawMessage{}
	for key, t := range map[string]string{"listeners": typeListener, "clusters": typeCluster, "endpoints": typeEndpoint, "routes": typeRoute} {
		names := make([]string, 0, len(s.resources[t]))
		for n := range s.resources[t] {
			names = append(names, n)
		}
		sort.Strings(names)
		out[key] = []json.RawMessage{}
		for _, n := range names {
			m, err := s.resources[t][n].UnmarshalNew()
			if err != nil {
				return nil, err
			}
			text, err := protojson.Marshal(m)
			if err != nil {
				return nil, fmt.Errorf("%s %s: %v", t, n, err)
			}
			out[key] = append(out[key], text)
		}
	}
	return json.Marshal(out)
}
