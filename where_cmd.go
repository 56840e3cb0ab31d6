package main

// `kubectl stickylb where` asks every replica where its dataplane sends a
// client now, and compares the answers. The answer must be what the
// dataplane does, pins included, and pins live only in the replicas, so the
// replicas answer for themselves (proxy.Where: the same choice a new flow
// makes, with no side effect) on an endpoint bound to the pod's loopback.
// Only processes in the pod reach it, and the plugin gets there with
// `kubectl exec` of `stickylb where-local` in each replica: the API server
// authenticates the user and authorizes pods/exec in stickylb's namespace,
// so no new credential or open port is needed. Outside a cluster (tests,
// the demo), --replicas names the endpoints to ask directly.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/go-logr/logr"

	"github.com/stickylb/stickylb/dataplane/proxy"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// defaultDebugAddress is where a replica answers "where" questions, on
// loopback only: in a cluster, the pod's; outside one, see debugAddress.
const defaultDebugAddress = "127.0.0.1:8082"

// debugAddress is the where endpoint's address: the flag's, or by default
// port 8082 on the dataplane's address when that is a loopback one (so
// that several replicas on one machine, 127.0.0.1 and 127.0.0.2, each have
// theirs), else on 127.0.0.1.
func debugAddress(flagValue string, dataplane netip.Addr) string {
	if flagValue != "" {
		return flagValue
	}
	if dataplane.IsLoopback() {
		return netip.AddrPortFrom(dataplane, 8082).String()
	}
	return defaultDebugAddress
}

// replicaAnswer is one replica's answer, as the endpoint returns it.
type replicaAnswer struct {
	Replica string `json:"replica"`
	proxy.Answer
	Error string `json:"error,omitempty"`
}

// replicaStatus is one replica's view of some rules (GET /status).
type replicaStatus struct {
	Replica string `json:"replica"`
	// Snapshot is the configuration version the replica serves.
	Snapshot uint64           `json:"snapshot"`
	Rules    []proxy.RuleView `json:"rules"`
	// Missing maps the rules asked for that the replica does not serve to why.
	Missing map[string]string `json:"missing,omitempty"`
	Error   string            `json:"error,omitempty"`
}

// whereServer serves, on loopback:
//
//	GET /where?rule=NS/NAME&client=IP&protocol=tcp|udp
//	GET /status?rule=NS/NAME[&rule=...]   (every rule served when none is named)
type whereServer struct {
	addr    string
	replica string
	log     logr.Logger
	proxy   *proxy.Proxy
}

func (s *whereServer) NeedLeaderElection() bool { return false }

// Start serves until ctx ends. An address it cannot listen on is logged,
// and the replica goes on serving traffic without the endpoint.
func (s *whereServer) Start(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		s.log.Error(err, "the where endpoint is off: set --debug-bind-address to a free loopback address", "address", s.addr)
		<-ctx.Done()
		return nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /where", s.serveWhere)
	mux.HandleFunc("GET /status", s.serveStatus)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func (s *whereServer) serveWhere(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	out := replicaAnswer{Replica: s.replica}
	status := http.StatusOK
	rule, client, proto, err := whereQuery(r.URL.Query().Get("rule"), r.URL.Query().Get("client"), r.URL.Query().Get("protocol"))
	if err == nil {
		if out.Answer, err = s.proxy.Where(rule, client, proto); err != nil {
			status = http.StatusNotFound
		}
	} else if status == http.StatusOK {
		status = http.StatusBadRequest
	}
	if err != nil {
		out.Error = err.Error()
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(out)
}

func (s *whereServer) serveStatus(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	out := replicaStatus{Replica: s.replica, Snapshot: s.proxy.Version(), Rules: []proxy.RuleView{}}
	names := r.URL.Query()["rule"]
	if len(names) == 0 {
		names = s.proxy.Rules()
	}
	for _, name := range names {
		v, err := s.proxy.View(name)
		if err != nil {
			if out.Missing == nil {
				out.Missing = map[string]string{}
			}
			out.Missing[name] = err.Error()
			continue
		}
		out.Rules = append(out.Rules, v)
	}
	_ = json.NewEncoder(w).Encode(out)
}

// whereQuery checks a question's parts.
func whereQuery(rule, client, protocol string) (string, netip.Addr, snapshot.Protocol, error) {
	if ns, name, ok := strings.Cut(rule, "/"); !ok || ns == "" || name == "" {
		return "", netip.Addr{}, 0, fmt.Errorf("rule %q: want NAMESPACE/NAME", rule)
	}
	ip, err := netip.ParseAddr(client)
	if err != nil {
		return "", netip.Addr{}, 0, fmt.Errorf("client %q: not an IP address", client)
	}
	switch strings.ToLower(protocol) {
	case "", "tcp":
		return rule, ip.Unmap(), snapshot.TCP, nil
	case "udp":
		return rule, ip.Unmap(), snapshot.UDP, nil
	}
	return "", netip.Addr{}, 0, fmt.Errorf("protocol %q: want tcp or udp", protocol)
}

// askReplica asks the where endpoint at addr.
func askReplica(ctx context.Context, addr, rule string, client netip.Addr, protocol string) replicaAnswer {
	q := url.Values{"rule": {rule}, "client": {client.String()}, "protocol": {protocol}}
	var a replicaAnswer
	if err := getJSON(ctx, addr, "/where", q, &a); err != nil {
		return replicaAnswer{Replica: addr, Error: err.Error()}
	}
	return a
}

// askStatus asks the status endpoint at addr about rules (all when none).
func askStatus(ctx context.Context, addr string, rules []string) replicaStatus {
	var st replicaStatus
	if err := getJSON(ctx, addr, "/status", url.Values{"rule": rules}, &st); err != nil {
		return replicaStatus{Replica: addr, Error: err.Error()}
	}
	return st
}

// getJSON decodes what a replica's debug endpoint answers at path.
func getJSON(ctx context.Context, addr, path string, q url.Values, out any) error {
	u := url.URL{Scheme: "http", Host: addr, Path: path, RawQuery: q.Encode()}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("HTTP %d: %w", resp.StatusCode, err)
	}
	return nil
}

// runWhereLocal is `stickylb where-local`: what `kubectl stickylb where`
// runs in each replica's container, asking the manager beside it. With
// --status it asks for the rules' status instead (`kubectl stickylb
// status`), --rule repeated or left out for every rule.
func runWhereLocal(args []string) int {
	fs := flag.NewFlagSet("stickylb where-local", flag.ContinueOnError)
	addr := fs.String("debug-address", defaultDebugAddress, "the manager's --debug-bind-address")
	var rules stringList
	fs.Var(&rules, "rule", "NAMESPACE/NAME of the rule (with --status: repeatable, none for every rule)")
	client := fs.String("client", "", "the client's IP address")
	protocol := fs.String("protocol", "tcp", "tcp or udp")
	status := fs.Bool("status", false, "print the rules' status on this replica instead")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if *status {
		st := askStatus(ctx, *addr, rules)
		_ = json.NewEncoder(os.Stdout).Encode(st)
		if st.Error != "" {
			return 1
		}
		return 0
	}
	if len(rules) != 1 {
		fmt.Fprintln(os.Stderr, "--rule: want one NAMESPACE/NAME")
		return 2
	}
	ip, err := netip.ParseAddr(*client)
	if err != nil {
		fmt.Fprintf(os.Stderr, "--client %q: not an IP address\n", *client)
		return 2
	}
	a := askReplica(ctx, *addr, rules[0], ip, *protocol)
	_ = json.NewEncoder(os.Stdout).Encode(a)
	if a.Error != "" {
		return 1
	}
	return 0
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }
