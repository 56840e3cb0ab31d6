package maglev

import (
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"testing"
)

// The golden values pin the flow hash: it is shared by every replica, so a
// change here re-pins clients during a rolling upgrade. Do not update them
// without treating it as a breaking change.
func TestHashGolden(t *testing.T) {
	v4 := netip.MustParseAddr("192.0.2.7")
	v6 := netip.MustParseAddr("2001:db8::7")
	fe := "198.51.100.1:443"
	for _, tc := range []struct {
		name string
		got  uint64
		want uint64
	}{
		{"HashBytes empty", HashBytes(nil), 0xefd01f60ba992926},
		{"HashBytes", HashBytes([]byte("stickylb")), 0xe4e55c27cd00aeaa},
		{"HashString", HashString("stickylb"), 0xe4e55c27cd00aeaa},
		{"HashClient v4", HashClient(v4, fe), 0x811e3cc5b62a1a69},
		{"HashClient v6", HashClient(v6, fe), 0x532ef696fb93fc0},
		{"HashClientProtocol tcp", HashClientProtocol(v4, fe, 6), 0x496e0a18ad057d8d},
		{"HashClientProtocol udp", HashClientProtocol(v4, fe, 17), 0x32384f5fedf50fca},
		{"HashFlow", HashFlow(netip.AddrPortFrom(v4, 40000), netip.AddrPortFrom(v6, 443), 6), 0xf6e24e28b12279b4},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

// TestHasherIsFNV1a checks the core against the standard library's FNV-1a,
// so the hash is a documented function and not an accident of this code.
func TestHasherIsFNV1a(t *testing.T) {
	for _, in := range []string{"", "a", "stickylb", "\x00\x00a", "198.51.100.1:443"} {
		ref := fnv.New64a()
		ref.Write([]byte(in))
		if got, want := HashString(in), fmix64(ref.Sum64()); got != want {
			t.Errorf("HashString(%q) = %#x, want fmix64(FNV-1a) = %#x", in, got, want)
		}
	}
}

func TestHasherMatchesHelpers(t *testing.T) {
	ip := netip.MustParseAddr("192.0.2.7")
	var h Hasher
	h.Write16(ip.As16())
	h.WriteString("fe")
	if h.Sum64() != HashClient(ip, "fe") {
		t.Errorf("Hasher and HashClient disagree")
	}
	h.Reset()
	h.WriteString("stickylb")
	if h.Sum64() != HashBytes([]byte("stickylb")) || h.Sum64() != HashString("stickylb") {
		t.Errorf("WriteString, HashBytes and HashString disagree")
	}
	// Two writes hash as their concatenation.
	h.Reset()
	h.WriteString("sticky")
	h.WriteBytes([]byte("lb"))
	if h.Sum64() != HashString("stickylb") {
		t.Errorf("split writes differ from one write")
	}
	h.Reset()
	h.WriteUint16(0x0102)
	h.WriteUint64(0x030405060708090a)
	if h.Sum64() != HashBytes([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}) {
		t.Errorf("WriteUint16/WriteUint64 are not big-endian bytes")
	}
}

func TestHashDistinguishesInputs(t *testing.T) {
	v4 := netip.MustParseAddr("192.0.2.7")
	mapped := netip.MustParseAddr("::ffff:192.0.2.7")
	if HashClient(v4, "fe") != HashClient(mapped, "fe") {
		t.Errorf("IPv4 and IPv4-mapped forms of one client hash differently")
	}
	seen := map[uint64]string{}
	add := func(name string, h uint64) {
		if prev, ok := seen[h]; ok {
			t.Errorf("%s and %s hash alike", prev, name)
		}
		seen[h] = name
	}
	add("client", HashClient(v4, "fe"))
	add("other client", HashClient(netip.MustParseAddr("192.0.2.8"), "fe"))
	add("other frontend", HashClient(v4, "fe2"))
	add("tcp", HashClientProtocol(v4, "fe", 6))
	add("udp", HashClientProtocol(v4, "fe", 17))
	a, b := netip.MustParseAddrPort("192.0.2.7:1000"), netip.MustParseAddrPort("192.0.2.9:80")
	add("flow", HashFlow(a, b, 6))
	add("reverse flow", HashFlow(b, a, 6))
	add("flow udp", HashFlow(a, b, 17))
}

func TestHashAllocations(t *testing.T) {
	ip := netip.MustParseAddr("2001:db8::1")
	src, dst := netip.MustParseAddrPort("192.0.2.7:1000"), netip.MustParseAddrPort("192.0.2.9:80")
	fe := "198.51.100.1:443"
	b := []byte("stickylb")
	var sink uint64
	for name, f := range map[string]func(){
		"HashBytes":          func() { sink += HashBytes(b) },
		"HashClient":         func() { sink += HashClient(ip, fe) },
		"HashClientProtocol": func() { sink += HashClientProtocol(ip, fe, 6) },
		"HashFlow":           func() { sink += HashFlow(src, dst, 17) },
		"Hasher": func() {
			var h Hasher
			h.Write16(ip.As16())
			h.WriteString(fe)
			h.WriteUint8(6)
			h.WriteUint16(80)
			sink += h.Sum64()
		},
	} {
		if a := testing.AllocsPerRun(100, f); a != 0 {
			t.Errorf("%s allocates %.1f times", name, a)
		}
	}
}

// TestClientSpread checks what the proxy's integration test relies on: 500
// consecutive loopback clients spread evenly over four backends.
func TestClientSpread(t *testing.T) {
	tbl := mustBuild(t, []string{"127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004"}, 0)
	for _, fe := range []string{"127.0.0.1:8080", "10.96.0.10:80", "[fd00::10]:443", "default/web"} {
		for _, proto := range []int{-1, 6, 17} {
			t.Run(fmt.Sprintf("%s proto %d", fe, proto), func(t *testing.T) {
				counts := make([]int, tbl.Len())
				for i := range 500 {
					client := netip.AddrFrom4([4]byte{127, 0, byte(2 + i/256), byte(i)})
					h := HashClient(client, fe)
					if proto >= 0 {
						h = HashClientProtocol(client, fe, uint8(proto))
					}
					counts[tbl.Lookup(h)]++
				}
				lo, hi := slices.Min(counts), slices.Max(counts)
				if float64(hi) > 1.5*float64(lo) {
					t.Errorf("clients per backend %v: max/min %.2f > 1.5", counts, float64(hi)/float64(lo))
				}
			})
		}
	}
}

var sinkHash uint64

func BenchmarkHashClient(b *testing.B) {
	ip := netip.MustParseAddr("192.0.2.7")
	b.ReportAllocs()
	for b.Loop() {
		sinkHash += HashClient(ip, "198.51.100.1:443")
	}
}

func BenchmarkHashFlow(b *testing.B) {
	src, dst := netip.MustParseAddrPort("192.0.2.7:1000"), netip.MustParseAddrPort("192.0.2.9:80")
	b.ReportAllocs()
	for b.Loop() {
		sinkHash += HashFlow(src, dst, 6)
	}
}
