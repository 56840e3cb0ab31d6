package proxyheader

import (
	"bufio"
	"bytes"
	"net"
	"net/netip"
	"testing"

	proxyproto "github.com/pires/go-proxyproto"
)

// Headers are checked by parsing them with a PROXY protocol library, and
// version 1 also against the specification's exact text.
func TestHeadersParse(t *testing.T) {
	cases := []struct {
		src, dst string
		v1       string
	}{
		{"192.0.2.7:51234", "10.96.0.10:80", "PROXY TCP4 192.0.2.7 10.96.0.10 51234 80\r\n"},
		{"[2001:db8::7]:1", "[fd00::10]:65535", "PROXY TCP6 2001:db8::7 fd00::10 1 65535\r\n"},
		{"[::ffff:192.0.2.7]:4000", "[::ffff:10.0.0.1]:443", "PROXY TCP4 192.0.2.7 10.0.0.1 4000 443\r\n"},
		{"192.0.2.7:4000", "[fd00::1]:443", "PROXY TCP6 ::ffff:192.0.2.7 fd00::1 4000 443\r\n"},
	}
	for _, c := range cases {
		src, dst := netip.MustParseAddrPort(c.src), netip.MustParseAddrPort(c.dst)
		for _, v := range []Version{V1, V2} {
			h := Append(nil, v, src, dst)
			if v == V1 && string(h) != c.v1 {
				t.Errorf("v1 %s -> %s = %q, want %q", src, dst, h, c.v1)
			}
			if len(h) > MaxLen {
				t.Errorf("header of %d bytes, longer than MaxLen", len(h))
			}
			r := bufio.NewReader(bytes.NewReader(append(h, "hello"...)))
			got, err := proxyproto.Read(r)
			if err != nil {
				t.Fatalf("v%d %s -> %s: %v (%q)", v, src, dst, err, h)
			}
			if got.Version != byte(v) || got.Command != proxyproto.PROXY {
				t.Errorf("v%d: version %d command %v", v, got.Version, got.Command)
			}
			gs, gd := got.SourceAddr.(*net.TCPAddr).AddrPort(), got.DestinationAddr.(*net.TCPAddr).AddrPort()
			if gs.Addr().Unmap() != src.Addr().Unmap() || gs.Port() != src.Port() || gd.Addr().Unmap() != dst.Addr().Unmap() || gd.Port() != dst.Port() {
				t.Errorf("v%d: parsed %s -> %s, want %s -> %s", v, gs, gd, src, dst)
			}
			if rest, _ := r.ReadString(0); rest != "hello" {
				t.Errorf("v%d: the header ate the payload: %q left", v, rest)
			}
		}
	}
}

func TestLocalHeaders(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		got, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(Local(v))))
		if err != nil {
			t.Fatalf("v%d: %v", v, err)
		}
		if v == V2 && got.Command != proxyproto.LOCAL {
			t.Errorf("v2 probe header command %v, want LOCAL", got.Command)
		}
		if v == V1 && got.TransportProtocol != proxyproto.UNSPEC {
			t.Errorf("v1 probe header %v, want UNKNOWN", got.TransportProtocol)
		}
	}
	if string(Local(V1)) != "PROXY UNKNOWN\r\n" {
		t.Errorf("v1 local = %q", Local(V1))
	}
}

func TestAppendDoesNotAllocate(t *testing.T) {
	buf := make([]byte, 0, MaxLen)
	src, dst := netip.MustParseAddrPort("[2001:db8::7]:65535"), netip.MustParseAddrPort("[2001:db8::8]:65535")
	if n := testing.AllocsPerRun(100, func() { Append(buf[:0], V1, src, dst); Append(buf[:0], V2, src, dst) }); n != 0 {
		t.Errorf("Append allocates %v times", n)
	}
}
