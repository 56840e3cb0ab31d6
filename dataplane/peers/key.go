package peers

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"os"
)

// KeySize is the length of the peer key: AES-256-GCM.
const KeySize = 32

// LoadKey reads the peer key from path (--peer-key-file): the base64 (standard
// alphabet, padded or not) of KeySize random bytes, surrounding white space
// ignored.
func LoadKey(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--peer-key-file: %w", err)
	}
	text := bytes.TrimSpace(raw)
	if len(text) == 0 {
		return nil, fmt.Errorf("--peer-key-file %s is empty; it must hold the base64 of %d random bytes (e.g. `head -c %d /dev/urandom | base64`)", path, KeySize, KeySize)
	}
	enc := base64.StdEncoding
	if len(text)%4 != 0 {
		enc = base64.RawStdEncoding
	}
	key := make([]byte, enc.DecodedLen(len(text)))
	n, err := enc.Decode(key, text)
	if err != nil {
		return nil, fmt.Errorf("--peer-key-file %s is not base64: %w; it must hold the base64 of %d random bytes", path, err, KeySize)
	}
	if n != KeySize {
		return nil, fmt.Errorf("--peer-key-file %s holds a %d-byte key, want %d bytes (the base64 of %d random bytes)", path, n, KeySize, KeySize)
	}
	return key[:n], nil
}
