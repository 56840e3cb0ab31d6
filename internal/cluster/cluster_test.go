package cluster

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"slices"
	"testing"
)

// A re-executed stage must read its own value: with a duplicate, a child
// reads the first one, and the test binary would re-run itself forever.
func TestSetEnvReplaces(t *testing.T) {
	env := []string{"A=1", stageEnv + "=init", "B=2"}
	got := setEnv(env, stageEnv+"=test")
	want := []string{"A=1", "B=2", stageEnv + "=test"}
	if !slices.Equal(got, want) {
		t.Fatalf("setEnv = %v, want %v", got, want)
	}
	if got := setEnv([]string{"AB=1"}, "A=2"); !slices.Equal(got, []string{"AB=1", "A=2"}) {
		t.Fatalf("setEnv dropped a key that only starts like another: %v", got)
	}
}

func TestClientIPsAreDistinctAndRouted(t *testing.T) {
	seen := map[string]bool{}
	for i := range 1000 {
		ip := ClientIP(i)
		if !Clients.Contains(ip) {
			t.Fatalf("ClientIP(%d) = %s, outside %s", i, ip, Clients)
		}
		if b := ip.As4(); b[3] == 0 || b[3] == 255 {
			t.Fatalf("ClientIP(%d) = %s: a network or broadcast address", i, ip)
		}
		if seen[ip.String()] {
			t.Fatalf("ClientIP(%d) = %s twice", i, ip)
		}
		seen[ip.String()] = true
	}
}

func TestAuthorityIssuesClientAndServingCertificates(t *testing.T) {
	ca, err := newAuthority()
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	parse := func(p keyPair) *x509.Certificate {
		b, _ := pem.Decode(p.cert)
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	client, err := ca.issue("system:node:n", []string{"system:nodes"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := parse(client)
	if c.Subject.CommonName != "system:node:n" || !slices.Equal(c.Subject.Organization, []string{"system:nodes"}) {
		t.Errorf("client subject %v: the API server reads the user from CN and the groups from O", c.Subject)
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client certificate: %v", err)
	}

	serving, err := ca.issue("kube-apiserver", nil, []net.IP{NodeIP.AsSlice()}, []string{"kubernetes.default.svc"})
	if err != nil {
		t.Fatal(err)
	}
	s := parse(serving)
	for _, name := range []string{NodeIP.String(), "kubernetes.default.svc"} {
		if _, err := s.Verify(x509.VerifyOptions{Roots: roots, DNSName: name}); err != nil {
			t.Errorf("serving certificate for %s: %v", name, err)
		}
	}
}
