package snapshot

import (
	"net/netip"
	"reflect"
	"slices"
	"testing"
	"time"
)

func testRule() Rule {
	return Rule{
		Name: "ns/web", Generation: 3, Frontend: "ns/default", Bind: netip.MustParseAddr("10.0.0.1"), Port: 80,
		Protocols: []Protocol{TCP, UDP}, Persistence: PersistenceClientIP, IdleTimeout: time.Minute, TCPReset: true,
		Probe:      &Probe{Protocol: ProbeHTTP, Port: 8080, Path: "/", Interval: time.Second, Threshold: 2},
		PinTimeout: time.Hour, ProxyProtocol: ProxyV2, AllProbedUp: true,
		Backends: []Backend{{Addr: netip.MustParseAddrPort("10.1.0.1:8080")}, {Addr: netip.MustParseAddrPort("10.1.0.2:8080"), Draining: true}},
	}
}

// TestRuleEqualSeesEveryField changes each field of a rule in turn: Equal
// must see every change (a field added to Rule must be compared too).
func TestRuleEqualSeesEveryField(t *testing.T) {
	base := testRule()
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		changed := testRule()
		f := reflect.ValueOf(&changed).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString(f.String() + "x")
		case reflect.Int64:
			f.SetInt(f.Int() + 1)
		case reflect.Uint8, reflect.Uint16:
			f.SetUint(f.Uint() + 1)
		case reflect.Bool:
			f.SetBool(!f.Bool())
		case reflect.Slice:
			f.Set(f.Slice(0, f.Len()-1))
		case reflect.Pointer:
			p := *changed.Probe
			p.Threshold++
			changed.Probe = &p
		case reflect.Struct: // netip.Addr
			changed.Bind = netip.MustParseAddr("10.0.0.2")
		default:
			t.Fatalf("field %s: kind %s not covered by this test", typ.Field(i).Name, f.Kind())
		}
		if base.Equal(&changed) || changed.Equal(&base) {
			t.Errorf("rules differing in %s are Equal", typ.Field(i).Name)
		}
	}
	other := testRule()
	if !base.Equal(&other) {
		t.Error("equal rules, built apart, are not Equal")
	}
	other.Backends = slices.Clone(other.Backends)
	other.Backends[1].Draining = false
	if base.Equal(&other) {
		t.Error("a backend that stopped draining is not seen")
	}
	shared := base
	if !base.Equal(&shared) {
		t.Error("a copy is not Equal")
	}
	other.Probe = nil
	if base.Equal(&other) || other.Equal(&base) {
		t.Error("a rule without a probe is Equal to one with")
	}
}
