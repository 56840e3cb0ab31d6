package peers

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/stickylb/stickylb/dataplane/pins"
)

// The wire format of a pin message, version 1. Every integer is big-endian.
//
//	offset 0   version    1 byte, wireVersion
//	offset 1   id         8 bytes: random, so a receiver can drop the copies
//	                      gossip retransmits; 0 in a push/pull state
//	offset 9   sent       8 bytes: the sender's clock, Unix milliseconds
//	offset 17  batches, one after the other until the end:
//	             rule     uvarint length (1..maxRuleLen), then the name
//	             count    uvarint (>= 1)
//	             pins     count × pinSize bytes:
//	                        key 8, backend 8, gen 4, since 4, seen 4
//
// An announcement carries one batch; a push/pull state one per rule.
const (
	wireVersion = 1
	headerLen   = 1 + 8 + 8
	pinSize     = 8 + 8 + 4 + 4 + 4
	// maxRuleLen bounds a rule name: "namespace/name" is at most 63+1+253.
	maxRuleLen = 512
	// MaxStateBytes bounds an encoded push/pull state. memberlist refuses
	// states above 20 MiB and warns above 60% of that; staying under the
	// warning leaves room for its own node list.
	MaxStateBytes = 11 << 20
	// maxPacketBytes bounds an announcement: one UDP datagram.
	maxPacketBytes = 64 << 10
)

var (
	// ErrVersion: the message is of a version this replica does not speak.
	ErrVersion = errors.New("unknown pin message version")
	// ErrMalformed: the message is truncated, too large, or not a pin message.
	ErrMalformed = errors.New("malformed pin message")
)

// Batch is the pins of one rule.
type Batch struct {
	Rule string
	Pins []pins.Pin
}

// Message is a decoded pin message.
type Message struct {
	ID      uint64
	Sent    time.Time // millisecond precision
	Batches []Batch
}

// appendHeader starts a message.
func appendHeader(b []byte, id uint64, sent time.Time) []byte {
	b = append(b, wireVersion)
	b = binary.BigEndian.AppendUint64(b, id)
	return binary.BigEndian.AppendUint64(b, uint64(sent.UnixMilli()))
}

// batchOverhead is what a batch of rule costs besides its pins, at most.
func batchOverhead(rule string) int {
	return binary.MaxVarintLen64 + len(rule) + binary.MaxVarintLen64
}

// appendBatch adds the pins of one rule to a message. ps must not be empty
// and rule must be 1..maxRuleLen bytes long: the decoder refuses anything else.
func appendBatch(b []byte, rule string, ps []pins.Pin) []byte {
	b = binary.AppendUvarint(b, uint64(len(rule)))
	b = append(b, rule...)
	b = binary.AppendUvarint(b, uint64(len(ps)))
	for _, p := range ps {
		b = binary.BigEndian.AppendUint64(b, p.Key)
		b = binary.BigEndian.AppendUint64(b, p.Backend)
		b = binary.BigEndian.AppendUint32(b, p.Gen)
		b = binary.BigEndian.AppendUint32(b, p.Since)
		b = binary.BigEndian.AppendUint32(b, p.Seen)
	}
	return b
}

// Encode writes m in the current version.
func Encode(m Message) []byte {
	n := headerLen
	for _, bt := range m.Batches {
		n += batchOverhead(bt.Rule) + len(bt.Pins)*pinSize
	}
	b := appendHeader(make([]byte, 0, n), m.ID, m.Sent)
	for _, bt := range m.Batches {
		b = appendBatch(b, bt.Rule, bt.Pins)
	}
	return b
}

// Decode reads a message of at most MaxStateBytes. It never trusts a length
// it has not checked against what is left of b, so what it allocates is
// bounded by len(b).
func Decode(b []byte) (Message, error) {
	if len(b) == 0 {
		return Message{}, fmt.Errorf("%w: empty", ErrMalformed)
	}
	if b[0] != wireVersion {
		return Message{}, fmt.Errorf("%w %d (this replica speaks %d)", ErrVersion, b[0], wireVersion)
	}
	if len(b) > MaxStateBytes {
		return Message{}, fmt.Errorf("%w: %d bytes, more than %d", ErrMalformed, len(b), MaxStateBytes)
	}
	if len(b) < headerLen {
		return Message{}, fmt.Errorf("%w: %d bytes, shorter than its header", ErrMalformed, len(b))
	}
	m := Message{
		ID:   binary.BigEndian.Uint64(b[1:9]),
		Sent: time.UnixMilli(int64(binary.BigEndian.Uint64(b[9:17]))),
	}
	rest := b[headerLen:]
	for len(rest) > 0 {
		off := len(b) - len(rest)
		n, k := binary.Uvarint(rest)
		if k <= 0 || n == 0 || n > maxRuleLen || n > uint64(len(rest)-k) {
			return Message{}, fmt.Errorf("%w: bad rule name length at byte %d", ErrMalformed, off)
		}
		rule := string(rest[k : k+int(n)])
		rest = rest[k+int(n):]
		count, k := binary.Uvarint(rest)
		if k <= 0 || count == 0 || count > uint64(len(rest)-k)/pinSize {
			return Message{}, fmt.Errorf("%w: bad pin count for rule %q", ErrMalformed, rule)
		}
		rest = rest[k:]
		ps := make([]pins.Pin, count)
		for i := range ps {
			ps[i] = pins.Pin{
				Key:     binary.BigEndian.Uint64(rest[0:]),
				Backend: binary.BigEndian.Uint64(rest[8:]),
				Gen:     binary.BigEndian.Uint32(rest[16:]),
				Since:   binary.BigEndian.Uint32(rest[20:]),
				Seen:    binary.BigEndian.Uint32(rest[24:]),
			}
			rest = rest[pinSize:]
		}
		m.Batches = append(m.Batches, Batch{Rule: rule, Pins: ps})
	}
	return m, nil
}
