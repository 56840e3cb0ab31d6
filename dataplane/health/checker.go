package health

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"time"

	"github.com/stickylb/stickylb/dataplane/proxyheader"
)

const (
	userAgent = "stickylb-probe"
	// maxBodyRead bounds how much of a response body a probe reads: enough
	// to let a small health page finish, never a large download.
	maxBodyRead = 4 << 10
	// maxHeaderBytes bounds response headers for the same reason.
	maxHeaderBytes = 16 << 10
)

// A checker performs one probe of one protocol. It reports whether the
// backend passed and a short human-readable reason. The context carries the
// probe's deadline.
type checker interface {
	check(ctx context.Context, addr netip.AddrPort) (ok bool, reason string)
}

// tcpChecker passes when a TCP handshake with the backend completes (and
// the PROXY protocol header, if any, is written).
type tcpChecker struct {
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

func (c tcpChecker) check(ctx context.Context, addr netip.AddrPort) (bool, string) {
	conn, err := c.dial(ctx, "tcp", addr.String())
	if err != nil {
		return false, describe(err)
	}
	conn.Close()
	return true, "TCP connect succeeded"
}

// dialer returns how probes connect: a plain dial, or one that writes the
// PROXY protocol header of a connection without a client right after the
// handshake.
func dialer(v proxyheader.Version) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d := &net.Dialer{KeepAlive: -1}
	if v == 0 {
		return d.DialContext
	}
	header := proxyheader.Local(v)
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if deadline, ok := ctx.Deadline(); ok {
			_ = conn.SetWriteDeadline(deadline)
		}
		if _, err := conn.Write(header); err != nil {
			conn.Close()
			return nil, fmt.Errorf("PROXY protocol header: %w", err)
		}
		_ = conn.SetWriteDeadline(time.Time{})
		return conn, nil
	}
}

// httpChecker passes only when GET path answers 200.
type httpChecker struct {
	client *http.Client
	scheme string
	path   string
}

func (c httpChecker) check(ctx context.Context, addr netip.AddrPort) (bool, string) {
	hostport := addr.String()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.scheme+"://"+hostport+c.path, nil)
	if err != nil {
		return false, describe(err)
	}
	req.Host = hostport
	req.Header.Set("User-Agent", userAgent)
	resp, err := c.client.Do(req)
	if err != nil {
		return false, describe(err)
	}
	// The status decides; draining a little lets a well-behaved server
	// finish its write before the connection closes under it.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxBodyRead))
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK, "HTTP " + strconv.Itoa(resp.StatusCode)
}

// newHTTPClient returns the client shared by a Monitor's HTTP and HTTPS
// probes whose connections open with the PROXY protocol header of version
// v (0: none).
func newHTTPClient(v proxyheader.Version) *http.Client {
	transport := &http.Transport{
		// No Proxy: a probe must reach the backend itself, never an
		// HTTP_PROXY from the environment.
		DialContext: dialer(v),
		// A fresh connection per probe, so every probe also tests that
		// the backend still accepts connections.
		DisableKeepAlives:      true,
		DisableCompression:     true,
		MaxResponseHeaderBytes: maxHeaderBytes,
		// Azure does not validate the backend's certificate either: the
		// probe checks liveness, not identity.
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // see above
	}
	return &http.Client{
		Transport: transport,
		// A redirect is a failure (only 200 passes); following it would
		// probe some other endpoint.
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

func newChecker(s Spec, client *http.Client) checker {
	switch s.Protocol {
	case HTTP:
		return httpChecker{client: client, scheme: "http", path: s.RequestPath}
	case HTTPS:
		return httpChecker{client: client, scheme: "https", path: s.RequestPath}
	default:
		return tcpChecker{dial: dialer(s.ProxyHeader)}
	}
}

// describe turns a dial or request error into a short reason, dropping the
// operation and address the reader already knows from the target, so
// "dial tcp 10.0.0.4:80: connect: connection refused" reads
// "connect: connection refused".
func describe(err error) string {
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Err != nil {
		return opErr.Err.Error()
	}
	var urlErr *url.Error
	if errors.As(err, &urlErr) && urlErr.Err != nil {
		return urlErr.Err.Error()
	}
	return err.Error()
}
