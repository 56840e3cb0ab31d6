package peers

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stickylb/stickylb/dataplane/pins"
)

func randomMessage(r *rand.Rand) Message {
	m := Message{ID: r.Uint64(), Sent: time.UnixMilli(r.Int64N(1 << 45))}
	for range r.IntN(5) {
		name := make([]byte, 1+r.IntN(maxRuleLen))
		for i := range name {
			name[i] = byte(r.IntN(256))
		}
		ps := make([]pins.Pin, 1+r.IntN(200))
		for i := range ps {
			ps[i] = pins.Pin{Key: r.Uint64(), Backend: r.Uint64(), Gen: r.Uint32(), Since: r.Uint32(), Seen: r.Uint32()}
		}
		m.Batches = append(m.Batches, Batch{Rule: string(name), Pins: ps})
	}
	return m
}

// TestRoundTrip: whatever is encoded decodes to itself, and costs pinSize
// bytes a pin plus small, bounded overheads.
func TestRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		m := randomMessage(r)
		b := Encode(m)
		got, err := Decode(b)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("message %d: decoded %+v, encoded %+v", i, got, m)
		}
		size := headerLen
		for _, bt := range m.Batches {
			size += len(bt.Rule) + len(bt.Pins)*pinSize
		}
		if len(b) < size || len(b) > size+len(m.Batches)*2*binary.MaxVarintLen16 {
			t.Fatalf("message %d: %d bytes encoded, want %d plus at most %d bytes of lengths", i, len(b), size, len(m.Batches)*2*binary.MaxVarintLen16)
		}
	}
}

func TestPinCostsTwentyEightBytes(t *testing.T) {
	one := Encode(Message{Batches: []Batch{{Rule: "default/web", Pins: make([]pins.Pin, 1)}}})
	two := Encode(Message{Batches: []Batch{{Rule: "default/web", Pins: make([]pins.Pin, 2)}}})
	if d := len(two) - len(one); d != 28 {
		t.Errorf("a pin costs %d bytes on the wire, want 28", d)
	}
	if len(one) != headerLen+1+len("default/web")+1+28 {
		t.Errorf("a message of one pin is %d bytes", len(one))
	}
}

func TestDecodeRejects(t *testing.T) {
	valid := Encode(Message{ID: 7, Sent: time.UnixMilli(1000), Batches: []Batch{{Rule: "ns/r", Pins: []pins.Pin{{Key: 1, Backend: 2}}}}})
	withBatch := func(rule []byte, count uint64, pinBytes int) []byte {
		b := appendHeader(nil, 1, time.UnixMilli(0))
		b = binary.AppendUvarint(b, uint64(len(rule)))
		b = append(b, rule...)
		b = binary.AppendUvarint(b, count)
		return append(b, make([]byte, pinBytes)...)
	}
	oversized := make([]byte, MaxStateBytes+1)
	oversized[0] = wireVersion
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, ErrMalformed},
		{"version 0", append([]byte{0}, valid[1:]...), ErrVersion},
		{"version 2", append([]byte{2}, valid[1:]...), ErrVersion},
		{"short header", valid[:headerLen-1], ErrMalformed},
		{"truncated in a pin", valid[:len(valid)-1], ErrMalformed},
		{"truncated after the rule", valid[:headerLen+1+len("ns/r")], ErrMalformed},
		{"trailing byte", append(append([]byte{}, valid...), 0), ErrMalformed},
		{"empty rule name", withBatch(nil, 1, pinSize), ErrMalformed},
		{"rule name too long", withBatch(bytes.Repeat([]byte("a"), maxRuleLen+1), 1, pinSize), ErrMalformed},
		{"no pins", withBatch([]byte("ns/r"), 0, 0), ErrMalformed},
		{"more pins than bytes", withBatch([]byte("ns/r"), 1<<40, pinSize), ErrMalformed},
		{"count overflows", append(withBatch([]byte("ns/r"), 1, 0)[:headerLen+5], 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01), ErrMalformed},
		{"rule length overflows", append(appendHeader(nil, 1, time.Time{}), bytes.Repeat([]byte{0xff}, 11)...), ErrMalformed},
		{"larger than a state may be", oversized, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Decode(tc.in)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Decode = %+v, %v; want %v", m, err, tc.want)
			}
		})
	}
	if _, err := Decode(valid); err != nil {
		t.Fatalf("the valid message: %v", err)
	}
}

// FuzzDecode: any input is refused with an error or decodes to a message
// that costs no more than its input, and encodes to bytes that decode to
// the same message.
func FuzzDecode(f *testing.F) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 8 {
		f.Add(Encode(randomMessage(r)))
	}
	f.Add(Encode(Message{}))
	f.Add([]byte{wireVersion})
	f.Add([]byte{2, 0, 0})
	f.Add(append(appendHeader(nil, 1, time.Time{}), 4, 'n', 's', '/', 'r', 0xff, 0xff, 0xff, 0xff, 0x0f))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("error of no known kind: %v", err)
			}
			if m.Batches != nil {
				t.Fatalf("an error with batches: %+v", m)
			}
			return
		}
		cost := headerLen
		for _, bt := range m.Batches {
			if bt.Rule == "" || len(bt.Rule) > maxRuleLen || len(bt.Pins) == 0 {
				t.Fatalf("accepted a batch it must refuse: rule %q, %d pins", bt.Rule, len(bt.Pins))
			}
			cost += 2 + len(bt.Rule) + len(bt.Pins)*pinSize
		}
		if cost > len(b) {
			t.Fatalf("%d input bytes decoded into %d bytes' worth", len(b), cost)
		}
		again, err := Decode(Encode(m))
		if err != nil {
			t.Fatalf("re-encoding a decoded message: %v", err)
		}
		if !reflect.DeepEqual(again, m) {
			t.Fatalf("re-encoded message decodes to %+v, want %+v", again, m)
		}
	})
}

func TestLoadKey(t *testing.T) {
	key := bytes.Repeat([]byte{0xA5}, KeySize)
	std := "paWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaU="
	for _, tc := range []struct {
		name, content, wantErr string
	}{
		{"padded", std, ""},
		{"with a newline, as kubectl writes it", std + "\n", ""},
		{"unpadded", strings.TrimRight(std, "="), ""},
		{"empty", "\n", "is empty"},
		{"not base64", "this is not a key!!", "is not base64"},
		{"16 bytes", "paWlpaWlpaWlpaWlpaWlpQ==", "16-byte key, want 32"},
		{"raw bytes instead of base64", string(key), "is not base64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := t.TempDir() + "/key"
			if err := writeFile(path, tc.content); err != nil {
				t.Fatal(err)
			}
			got, err := LoadKey(path)
			if tc.wantErr == "" {
				if err != nil || !bytes.Equal(got, key) {
					t.Fatalf("LoadKey = %x, %v; want %x", got, err, key)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "--peer-key-file") {
				t.Fatalf("LoadKey error %v; want one naming --peer-key-file and saying %q", err, tc.wantErr)
			}
		})
	}
	if _, err := LoadKey(t.TempDir() + "/missing"); err == nil || !strings.Contains(err.Error(), "--peer-key-file") {
		t.Fatalf("missing file: %v", err)
	}
}
