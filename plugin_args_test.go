package main

import (
	"bytes"
	"strings"
	"testing"
)

// Bad arguments get exit 2 and a message naming what is wrong, before any
// cluster is asked.
func TestPluginArgumentErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"status", "a", "b"}, "want at most one RULE"},
		{[]string{"status", "web", "-A"}, "not with -A"},
		{[]string{"status", "-o", "yaml"}, `--output "yaml": want text or json`},
		{[]string{"where", "web"}, "want RULE CLIENT_IP"},
		{[]string{"where", "web", "10.0.0.300"}, `CLIENT_IP "10.0.0.300": not an IP address`},
		{[]string{"where", "web", "10.0.0.1", "--output=table"}, `--output "table"`},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
	} {
		var stdout, stderr bytes.Buffer
		if code := runPlugin(tc.args, &stdout, &stderr); code != 2 {
			t.Errorf("%q: exit %d, want 2 (stderr %q)", tc.args, code, stderr.String())
		}
		if !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%q: stderr %q lacks %q", tc.args, stderr.String(), tc.want)
		}
		if stdout.Len() != 0 {
			t.Errorf("%q: printed %q on stdout", tc.args, stdout.String())
		}
	}
}
