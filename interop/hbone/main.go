// Command hbone-peer plays the two ends of an ambient double-HBONE tunnel
// through an east-west gateway, as test peers for strait:
//
//	hbone-peer source --gateway IP:PORT --cert-dir DIR [--gateway-id SPIFFE] [--dest-id SPIFFE]
//	                  [--network NET] [--double-dialer] --map LISTEN_ADDR=AUTHORITY [--map ...]
//	hbone-peer dest   --listen IP:PORT --cert-dir DIR --name NAME
//
// The source is a source ztunnel: each connection accepted on a --map
// listener becomes one tunnel. The outer level (mTLS 1.3 and HTTP/2 to the
// gateway, one CONNECT stream per tunnel, the HTTP/2 connection pooled for
// every tunnel to that gateway) is Istio's own pkg/hbone dialer. Inside that
// stream the source runs the inner level to the destination: a fresh TLS 1.3
// handshake, HTTP/2, CONNECT with the same :authority and
// x-forwarded-network, as ztunnel does.
//
// pkg/hbone's NewDoubleDialer does the inner level too, but hands back one
// end of a net.Pipe, which cannot half-close, ignores Config.Headers (no
// x-forwarded-network), and never closes the inner connection (the outer
// stream outlives its tunnel). The inner level here is the same x/net/http2
// client code NewDoubleDialer runs, driven so that a tunnel half-closes, carries
// the header and ends its outer stream when it ends. With --double-dialer the
// source uses NewDoubleDialer itself for both levels instead, with those three
// limits (a local FIN stops the copy towards the tunnel and is not passed on;
// the tunnel ends when the destination ends it or the local connection fails):
// the way to show that both inner levels look alike to a gateway and a
// destination.
//
// The destination is a destination ztunnel: TLS 1.3 with a required client
// certificate, HTTP/2, CONNECT answered with 200; it prints one JSON line per
// stream and echoes.
//
// DIR holds cert-chain.pem, key.pem and root-cert.pem (Istio's file-mounted
// layout, as `strait cert issue` writes it). SPIFFE identities are checked
// here (URI SAN), not by hostname.
//
// Both print READY on standard output once listening and exit 0 on SIGTERM.
// Istio's own log goes to standard error.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http2"

	"istio.io/istio/pkg/hbone"
	"istio.io/istio/pkg/log"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	logging := log.DefaultOptions()
	logging.OutputPaths = []string{"stderr"}
	logging.ErrorOutputPaths = []string{"stderr"}
	if err := log.Configure(logging); err != nil {
		fail("configure logging: %v", err)
	}
	var err error
	switch os.Args[1] {
	case "source":
		err = source(os.Args[2:])
	case "dest":
		err = dest(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fail("%v", err)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: hbone-peer source --gateway IP:PORT --cert-dir DIR [--gateway-id SPIFFE] [--dest-id SPIFFE] [--network NET] --map LISTEN_ADDR=AUTHORITY [--map ...]")
	fmt.Fprintln(os.Stderr, "       hbone-peer dest --listen IP:PORT --cert-dir DIR --name NAME")
	os.Exit(2)
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "hbone-peer: "+format+"\n", args...)
	os.Exit(1)
}

// stdout carries the lines a test reads; one line is one write.
var stdout sync.Mutex

func say(format string, args ...any) {
	stdout.Lock()
	defer stdout.Unlock()
	fmt.Fprintf(os.Stdout, format+"\n", args...)
}

// exitOnSignal exits 0 on SIGTERM or SIGINT.
func exitOnSignal() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-ch
		os.Exit(0)
	}()
}

// identity is a workload's SVID and the mesh root, read from an Istio
// file-mounted certificate directory.
type identity struct {
	cert  tls.Certificate
	roots *x509.CertPool
}

func loadIdentity(dir string) (identity, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		return identity{}, fmt.Errorf("certificate in %s: %v", dir, err)
	}
	rootPEM, err := os.ReadFile(filepath.Join(dir, "root-cert.pem"))
	if err != nil {
		return identity{}, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return identity{}, fmt.Errorf("%s/root-cert.pem: no certificate", dir)
	}
	return identity{cert: cert, roots: roots}, nil
}

// spiffeID is the first spiffe:// URI SAN of a certificate, or "".
func spiffeID(cert *x509.Certificate) string {
	for _, u := range cert.URIs {
		if u.Scheme == "spiffe" {
			return u.String()
		}
	}
	return ""
}

// verifyPeer checks the peer's chain against the mesh root and, when want is
// not empty, that its SPIFFE ID is exactly want. Hostnames play no part.
func verifyPeer(roots *x509.CertPool, want string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		leaf := cs.PeerCertificates[0]
		if _, err := leaf.Verify(x509.VerifyOptions{
			Roots:         roots,
			Intermediates: inter,
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		}); err != nil {
			return fmt.Errorf("peer certificate: %v", err)
		}
		if got := spiffeID(leaf); want != "" && got != want {
			return fmt.Errorf("peer is %q, want %q", got, want)
		}
		return nil
	}
}

// clientTLS is TLS 1.3 only, ALPN h2, the workload's certificate, no SNI
// (ServerName stays empty, or is the gateway's IP, which Go never sends), and
// the peer checked by verifyPeer.
func clientTLS(id identity, peerID string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		MaxVersion:         tls.VersionTLS13,
		NextProtos:         []string{"h2"},
		Certificates:       []tls.Certificate{id.cert},
		InsecureSkipVerify: true, // verifyPeer checks the chain and the SPIFFE ID
		VerifyConnection:   verifyPeer(id.roots, peerID),
	}
}

type mapFlag []string

func (m *mapFlag) String() string     { return strings.Join(*m, ",") }
func (m *mapFlag) Set(v string) error { *m = append(*m, v); return nil }

func source(args []string) error {
	fs := flag.NewFlagSet("source", flag.ExitOnError)
	gateway := fs.String("gateway", "", "the gateway's HBONE address, IP:PORT")
	certDir := fs.String("cert-dir", "", "cert-chain.pem, key.pem, root-cert.pem of the source workload")
	gatewayID := fs.String("gateway-id", "", "the gateway's SPIFFE ID (checked when given)")
	destID := fs.String("dest-id", "", "the destination's SPIFFE ID (checked when given)")
	network := fs.String("network", "", "x-forwarded-network on the inner CONNECT")
	double := fs.Bool("double-dialer", false, "both levels by pkg/hbone's NewDoubleDialer (no half-close, no x-forwarded-network)")
	var maps mapFlag
	fs.Var(&maps, "map", "LISTEN_ADDR=AUTHORITY (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *gateway == "" || *certDir == "" || len(maps) == 0 {
		return errors.New("source: --gateway, --cert-dir and at least one --map are required")
	}
	id, err := loadIdentity(*certDir)
	if err != nil {
		return err
	}
	// Istio's HBONE dialer: CONNECT to the gateway with :authority = the
	// dialled address, its HTTP/2 connection pooled across tunnels.
	outer := hbone.NewDialer(hbone.Config{ProxyAddress: *gateway, TLS: clientTLS(id, *gatewayID)})
	s := &sourcePeer{outer: outer, inner: clientTLS(id, *destID), network: *network}
	if *double {
		// The inner Config's TLS must be set (it makes the inner URL https);
		// its address only names the inner URL: an IP, so no SNI is sent.
		s.double = hbone.NewDoubleDialer(
			hbone.Config{ProxyAddress: *gateway, TLS: clientTLS(id, *gatewayID)},
			hbone.Config{ProxyAddress: *gateway, TLS: s.inner},
			s.inner,
		)
	}

	type bound struct {
		ln        net.Listener
		authority string
	}
	var listeners []bound
	for _, m := range maps {
		addr, authority, ok := strings.Cut(m, "=")
		if !ok || addr == "" || authority == "" {
			return fmt.Errorf("--map %q: want LISTEN_ADDR=AUTHORITY", m)
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("--map %q: %v", m, err)
		}
		listeners = append(listeners, bound{ln, authority})
	}
	exitOnSignal()
	for _, b := range listeners {
		go func() {
			for {
				conn, err := b.ln.Accept()
				if err != nil {
					fmt.Fprintf(os.Stderr, "hbone-peer: accept on %s: %v\n", b.ln.Addr(), err)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				go s.tunnel(conn.(*net.TCPConn), b.authority)
			}
		}()
	}
	say("READY")
	select {}
}

type sourcePeer struct {
	outer   hbone.Dialer
	inner   *tls.Config
	network string
	// double, when set, carries every tunnel (--double-dialer).
	double hbone.Dialer
}

// outerStatus is the HTTP status in one of pkg/hbone's errors, or 0.
func outerStatus(err error) int {
	if m := roundTripStatus.FindStringSubmatch(err.Error()); m != nil {
		status, _ := strconv.Atoi(m[1])
		return status
	}
	return 0
}

// roundTripStatus reads the status out of pkg/hbone's "round trip failed: 404 Not Found".
var roundTripStatus = regexp.MustCompile(`round trip failed: (\d{3})`)

func (s *sourcePeer) tunnel(local *net.TCPConn, authority string) {
	defer local.Close()
	refuse := func(status int, err error) {
		say("TUNNEL-ERROR authority=%s status=%d err=%s", authority, status, strings.ReplaceAll(err.Error(), "\n", " "))
	}
	if s.double != nil {
		s.doubleTunnel(local, authority, refuse)
		return
	}
	// Outer: Istio's dialer; a non-200 comes back as an error naming the status.
	outerConn, err := s.outer.DialContext(context.Background(), "tcp", authority)
	if err != nil {
		refuse(outerStatus(err), fmt.Errorf("outer CONNECT: %v", err))
		return
	}
	defer outerConn.Close()

	// Inner: a fresh TLS 1.3 session to the destination inside the outer stream.
	innerTLS := tls.Client(outerConn, s.inner)
	_ = outerConn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := innerTLS.Handshake(); err != nil {
		refuse(0, fmt.Errorf("inner TLS: %v", err))
		return
	}
	_ = outerConn.SetDeadline(time.Time{})
	defer innerTLS.Close()
	if p := innerTLS.ConnectionState().NegotiatedProtocol; p != "h2" {
		refuse(0, fmt.Errorf("inner TLS: ALPN %q, want h2", p))
		return
	}
	cc, err := (&http2.Transport{}).NewClientConn(innerTLS)
	if err != nil {
		refuse(0, fmt.Errorf("inner HTTP/2: %v", err))
		return
	}
	defer cc.Close()
	body, toTunnel := io.Pipe()
	req, err := http.NewRequest(http.MethodConnect, "https://"+authority, body)
	if err != nil {
		refuse(0, err)
		return
	}
	req.Host = authority
	if s.network != "" {
		req.Header.Set("x-forwarded-network", s.network)
	}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		refuse(0, fmt.Errorf("inner CONNECT: %v", err))
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		refuse(resp.StatusCode, fmt.Errorf("inner CONNECT: %s", resp.Status))
		return
	}
	say("TUNNEL-OK authority=%s", authority)

	done := make(chan struct{})
	go func() {
		// local -> tunnel; the local FIN ends the inner stream (END_STREAM).
		_, err := io.Copy(toTunnel, local)
		toTunnel.CloseWithError(err)
		close(done)
	}()
	// tunnel -> local; the inner stream's end becomes a FIN, its reset (or the
	// outer stream's) a reset of the local connection.
	if _, err := io.Copy(local, resp.Body); err != nil {
		_ = local.SetLinger(0)
		return
	}
	_ = local.CloseWrite()
	<-done
}

// doubleTunnel carries one tunnel on NewDoubleDialer. Its connection is one
// end of a net.Pipe: it cannot half-close, so a local FIN only stops the copy
// towards the tunnel; the tunnel ends when the destination ends it (or the
// local connection fails).
func (s *sourcePeer) doubleTunnel(local *net.TCPConn, authority string, refuse func(int, error)) {
	conn, err := s.double.DialContext(context.Background(), "tcp", authority)
	if err != nil {
		// The outer and inner CONNECT fail alike ("round trip failed: 404 ...").
		refuse(outerStatus(err), fmt.Errorf("double dialer: %v", err))
		return
	}
	defer conn.Close()
	say("TUNNEL-OK authority=%s", authority)
	go func() {
		_, _ = io.Copy(conn, local)
	}()
	if _, err := io.Copy(local, conn); err != nil {
		_ = local.SetLinger(0)
		return
	}
	_ = local.CloseWrite()
}

func dest(args []string) error {
	fs := flag.NewFlagSet("dest", flag.ExitOnError)
	listen := fs.String("listen", "", "IP:PORT to serve HBONE on")
	certDir := fs.String("cert-dir", "", "cert-chain.pem, key.pem, root-cert.pem of the destination workload")
	name := fs.String("name", "", "a name written at the start of every stream and printed per stream")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *listen == "" || *certDir == "" || *name == "" {
		return errors.New("dest: --listen, --cert-dir and --name are required")
	}
	id, err := loadIdentity(*certDir)
	if err != nil {
		return err
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		Certificates: []tls.Certificate{id.cert},
		ClientAuth:   tls.RequireAnyClientCert,
		// The chain is checked against the mesh root; any SPIFFE ID is accepted
		// and printed.
		VerifyConnection: verifyPeer(id.roots, ""),
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	// ztunnel's windows: 4 MiB per stream, 16 MiB per connection; frames up to 1 MiB.
	server := &http2.Server{
		MaxUploadBufferPerStream:     4 << 20,
		MaxUploadBufferPerConnection: 16 << 20,
		MaxReadFrameSize:             1 << 20,
	}
	handler := &destHandler{name: *name}
	exitOnSignal()
	say("READY")
	for {
		conn, err := ln.Accept()
		if err != nil {
			fmt.Fprintf(os.Stderr, "hbone-peer: accept: %v\n", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go func() {
			defer conn.Close()
			tc := tls.Server(conn, cfg)
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			if err := tc.Handshake(); err != nil {
				fmt.Fprintf(os.Stderr, "hbone-peer: TLS from %s: %v\n", conn.RemoteAddr(), err)
				return
			}
			_ = conn.SetDeadline(time.Time{})
			// x/net/http2 leaves Request.TLS nil for CONNECT (it has no
			// :scheme), so the peer is taken from the connection.
			peer := ""
			if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
				peer = spiffeID(certs[0])
			}
			server.ServeConn(tc, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				handler.serve(w, r, peer)
			})})
		}()
	}
}

type destHandler struct {
	name string
}

type streamLine struct {
	Name      string `json:"name"`
	Authority string `json:"authority"`
	Peer      string `json:"peer"`
	Network   string `json:"network"`
}

// serve answers one stream of a connection whose client is peer.
func (h *destHandler) serve(w http.ResponseWriter, r *http.Request, peer string) {
	if r.Method != http.MethodConnect {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	line := streamLine{Name: h.name, Authority: r.Host, Peer: peer, Network: r.Header.Get("x-forwarded-network")}
	text, err := json.Marshal(line)
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	say("%s", text)
	flusher, _ := w.(http.Flusher)
	flush := func() {
		if flusher != nil {
			flusher.Flush()
		}
	}
	w.WriteHeader(http.StatusOK)
	if _, err := io.WriteString(w, "["+h.name+"] "); err != nil {
		return
	}
	flush()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			flush()
		}
		if err != nil {
			// The client's END_STREAM (or reset): returning ends ours.
			return
		}
	}
}
