package maglev

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
)

// backendKeys returns n distinct backend keys in IP:port form.
func backendKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("10.%d.%d.%d:8080", i>>16&0xff, i>>8&0xff, i&0xff)
	}
	return keys
}

func mustBuild(t testing.TB, backends []string, size uint64) *Table {
	t.Helper()
	tbl, err := Build(backends, size)
	if err != nil {
		t.Fatalf("Build(%d backends, %d): %v", len(backends), size, err)
	}
	return tbl
}

// entries returns the slots as backend indices, whatever the entry width.
func entries(t *Table) []int {
	if t.tiny == nil && t.small == nil && t.large == nil {
		return nil
	}
	out := make([]int, t.size)
	for s := range out {
		out[s] = t.slot(uint64(s))
	}
	return out
}

func TestSizesArePrime(t *testing.T) {
	for i, s := range sizes {
		if !big.NewInt(int64(s)).ProbablyPrime(20) {
			t.Errorf("sizes[%d] = %d is not prime", i, s)
		}
		if i > 0 && s <= sizes[i-1] {
			t.Errorf("sizes not increasing at %d: %d after %d", i, s, sizes[i-1])
		}
	}
	for i, s := range sizes {
		// Each rung is the largest prime below 2^(13+i).
		next := uint64(1) << (13 + i)
		if s >= next {
			t.Errorf("sizes[%d] = %d, want below %d", i, s, next)
		}
		for p := s + 1; p < next; p++ {
			if isPrime(p) {
				t.Errorf("sizes[%d] = %d, but %d is a larger prime below %d", i, s, p, next)
			}
		}
	}
	if last := sizes[len(sizes)-1]; last > MaxSize {
		t.Errorf("largest size %d exceeds MaxSize %d", last, MaxSize)
	}
}

func TestIsPrimeAgreesWithBig(t *testing.T) {
	for n := range uint64(20000) {
		if got, want := isPrime(n), big.NewInt(int64(n)).ProbablyPrime(20); got != want {
			t.Fatalf("isPrime(%d) = %v, want %v", n, got, want)
		}
	}
}

func TestAutoSize(t *testing.T) {
	for _, tc := range []struct {
		backends int
		want     uint64
	}{
		{0, 8191},
		{1, 8191},
		{3, 8191},
		{4, 16381},
		{15, 16381},
		{16, 32749},
		{63, 32749},
		{64, 65521},
		{100, 65521},
		{255, 65521},
		{256, 131071},
		{1000, 131071},
		{1023, 131071},
		{1024, 262139},
		{2621, 262139},
		{2622, 524287},
		{167772, 16777213},
	} {
		got, err := chooseSize(tc.backends, 0)
		if err != nil || got != tc.want {
			t.Errorf("%d backends: size %d, %v; want %d", tc.backends, got, err, tc.want)
		}
		if got < 100*uint64(tc.backends) {
			t.Errorf("%d backends: size %d, below 100 per backend", tc.backends, got)
		}
		if float64(got) < disruptionScale*math.Sqrt(float64(tc.backends)) {
			t.Errorf("%d backends: size %d, below %d·sqrt(N)", tc.backends, got, disruptionScale)
		}
	}
	for _, n := range []int{3, 1000} {
		want, _ := chooseSize(n, 0)
		if got := mustBuild(t, backendKeys(n), 0).Size(); got != want {
			t.Errorf("Build(%d backends, 0).Size() = %d, want %d", n, got, want)
		}
	}
}

func TestBuildRejects(t *testing.T) {
	for _, tc := range []struct {
		name     string
		backends int
		size     uint64
		want     error
	}{
		{"not prime", 3, 65536, ErrInvalidSize},
		{"one", 0, 1, ErrInvalidSize},
		{"above MaxSize", 3, 16777259, ErrInvalidSize},
		{"fewer slots than backends", 8, 7, ErrTooManyBackends},
		{"auto beyond the size list", 167773, 0, ErrTooManyBackends},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tbl, err := Build(backendKeys(tc.backends), tc.size)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Build error = %v, want %v", err, tc.want)
			}
			if tbl != nil {
				t.Errorf("Build returned a table with an error")
			}
		})
	}
}

func TestEmptyTable(t *testing.T) {
	for _, backends := range [][]string{nil, {}} {
		tbl := mustBuild(t, backends, 0)
		for _, h := range []uint64{0, 1, 1 << 63, ^uint64(0)} {
			if got := tbl.Lookup(h); got != -1 {
				t.Errorf("Lookup(%d) on empty table = %d, want -1", h, got)
			}
			if got := tbl.Preference(h, 3); len(got) != 0 {
				t.Errorf("Preference(%d, 3) on empty table = %v, want none", h, got)
			}
		}
		if tbl.Len() != 0 {
			t.Errorf("Len() = %d, want 0", tbl.Len())
		}
	}
}

func TestBalance(t *testing.T) {
	for _, n := range []int{1, 2, 3, 4, 10, 97, 1000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			tbl := mustBuild(t, backendKeys(n), 0)
			counts := make([]int, n)
			for _, b := range entries(tbl) {
				counts[b]++
			}
			lo, hi := slices.Min(counts), slices.Max(counts)
			// Round-robin filling hands out slots one per backend per round.
			if hi-lo > 1 {
				t.Errorf("slots per backend range %d..%d, want a spread of at most 1", lo, hi)
			}
			mean := float64(tbl.Size()) / float64(n)
			if float64(hi-lo) > 0.01*mean {
				t.Errorf("spread %d exceeds 1%% of mean %.1f", hi-lo, mean)
			}
		})
	}
}

func TestLargeIndexTable(t *testing.T) {
	// 65535 backends need 32-bit entries; an explicit size keeps this quick.
	const n = 65535
	tbl := mustBuild(t, backendKeys(n), 131071)
	if tbl.large == nil || tbl.small != nil {
		t.Fatalf("%d backends: want 32-bit entries", n)
	}
	counts := make([]int, n)
	for _, b := range entries(tbl) {
		counts[b]++
	}
	if lo, hi := slices.Min(counts), slices.Max(counts); lo < 2 || hi > 3 {
		t.Errorf("slots per backend range %d..%d, want 2..3", lo, hi)
	}
	if small := mustBuild(t, backendKeys(n-1), 131071); small.small == nil {
		t.Errorf("%d backends: want 16-bit entries", n-1)
	}
	if tiny := mustBuild(t, backendKeys(254), 0); tiny.tiny == nil {
		t.Errorf("254 backends: want 8-bit entries")
	}
	if mid := mustBuild(t, backendKeys(255), 0); mid.small == nil {
		t.Errorf("255 backends: want 16-bit entries (255 is the empty marker)")
	}
}

func TestDeterminism(t *testing.T) {
	keys := backendKeys(50)
	want := mustBuild(t, keys, 0)
	wantEntries := entries(want)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20 {
		shuffled := slices.Clone(keys)
		rng.Shuffle(len(shuffled), func(a, b int) { shuffled[a], shuffled[b] = shuffled[b], shuffled[a] })
		if i%2 == 1 {
			// Duplicates count once.
			shuffled = append(shuffled, shuffled[:i]...)
		}
		got := mustBuild(t, shuffled, 0)
		if !slices.Equal(got.backends, want.backends) {
			t.Fatalf("shuffle %d: backends differ", i)
		}
		if !slices.Equal(entries(got), wantEntries) {
			t.Fatalf("shuffle %d: table differs", i)
		}
	}
	if got := want.Backends(); !slices.IsSorted(got) || len(got) != 50 {
		t.Errorf("Backends() = %v, want 50 sorted keys", got)
	}
}

func TestBuildDoesNotModifyInput(t *testing.T) {
	in := []string{"c", "a", "b", "a"}
	mustBuild(t, in, 0)
	if !slices.Equal(in, []string{"c", "a", "b", "a"}) {
		t.Errorf("Build reordered its input: %v", in)
	}
}

// TestGoldenTable pins the table layout: a change here re-pins clients
// between replicas of different versions. The 65537-slot case is the
// layout from before tables were sized to their pool: the fill is unchanged,
// only the size rule moved.
func TestGoldenTable(t *testing.T) {
	for _, tc := range []struct {
		size, wantSize uint64
		digest         uint64
		first          []int
	}{
		{65537, 65537, 0x3b44a8e19a0dc724, []int{2, 1, 2, 1, 0, 1, 1, 0, 0, 2, 2, 1}},
		{0, 8191, 0x7519fe70b0c85b61, []int{1, 2, 0, 2, 0, 1, 2, 1, 2, 0, 1, 2}},
	} {
		tbl := mustBuild(t, []string{"10.0.0.3:80", "10.0.0.1:80", "10.0.0.2:80"}, tc.size)
		if tbl.Size() != tc.wantSize {
			t.Errorf("Build(3 backends, %d).Size() = %d, want %d", tc.size, tbl.Size(), tc.wantSize)
			continue
		}
		var h Hasher
		for _, b := range entries(tbl) {
			h.WriteUint8(uint8(b))
		}
		if got := h.Sum64(); got != tc.digest {
			t.Errorf("size %d: table digest = %#x, want %#x", tc.size, got, tc.digest)
		}
		if got := entries(tbl)[:len(tc.first)]; !slices.Equal(got, tc.first) {
			t.Errorf("size %d: first slots = %v, want %v", tc.size, got, tc.first)
		}
	}
}

// moved counts, over hashes, keys whose backend changed between two tables,
// split into those that left a backend in gone, those that landed on a
// backend in added, and the rest.
func moved(before, after *Table, hashes []uint64, gone, added string) (fromGone, toAdded, other int) {
	for _, h := range hashes {
		b, a := before.Backend(before.Lookup(h)), after.Backend(after.Lookup(h))
		switch {
		case a == b:
		case b == gone:
			fromGone++
		case a == added:
			toAdded++
		default:
			other++
		}
	}
	return fromGone, toAdded, other
}

func randomHashes(n int) []uint64 {
	rng := rand.New(rand.NewPCG(3, 4))
	hashes := make([]uint64, n)
	for i := range hashes {
		hashes[i] = rng.Uint64()
	}
	return hashes
}

func TestMinimalDisruption(t *testing.T) {
	hashes := randomHashes(100000)
	for _, n := range []int{10, 100} {
		keys := backendKeys(n)
		before := mustBuild(t, keys, 0)
		for _, victim := range []int{0, n / 2, n - 1} {
			t.Run(fmt.Sprintf("remove %d of %d", victim, n), func(t *testing.T) {
				gone := keys[victim]
				after := mustBuild(t, slices.Delete(slices.Clone(keys), victim, victim+1), 0)
				kept := 0
				for _, h := range hashes {
					if before.Backend(before.Lookup(h)) != gone {
						kept++
					}
				}
				fromGone, _, other := moved(before, after, hashes, gone, "")
				t.Logf("%d of %d other keys moved", other, kept)
				if fromGone != len(hashes)-kept {
					t.Errorf("%d of %d keys of the removed backend moved", fromGone, len(hashes)-kept)
				}
				if frac := float64(other) / float64(kept); frac >= 0.01 {
					t.Errorf("%.3f%% of other keys moved, want under 1%%", 100*frac)
				}
			})
		}
	}
	t.Run("add 11th", func(t *testing.T) {
		keys := backendKeys(11)
		before := mustBuild(t, keys[:10], 0)
		after := mustBuild(t, keys, 0)
		_, toAdded, other := moved(before, after, hashes, "", keys[10])
		t.Logf("%d keys moved to the new backend, %d elsewhere", toAdded, other)
		total := float64(len(hashes))
		if frac := float64(toAdded+other) / total; frac > 1.0/11+0.01 {
			t.Errorf("%.3f%% of keys moved, want at most 1/11 + 1%%", 100*frac)
		}
		if frac := float64(other) / total; frac >= 0.01 {
			t.Errorf("%.3f%% of keys moved between old backends, want under 1%%", 100*frac)
		}
		if frac := float64(toAdded) / total; frac < 1.0/11-0.01 {
			t.Errorf("only %.3f%% of keys moved to the new backend, want about 1/11", 100*frac)
		}
	})
}

func TestPreference(t *testing.T) {
	tbl := mustBuild(t, backendKeys(10), 0)
	reversed := backendKeys(10)
	slices.Reverse(reversed)
	again := mustBuild(t, reversed, 0)
	for _, h := range randomHashes(2000) {
		for _, n := range []int{1, 3, 10, 25} {
			got := tbl.Preference(h, n)
			if want := min(n, 10); len(got) != want {
				t.Fatalf("Preference(%d, %d) has %d backends, want %d", h, n, len(got), want)
			}
			if got[0] != tbl.Lookup(h) {
				t.Fatalf("Preference(%d, %d)[0] = %d, want Lookup = %d", h, n, got[0], tbl.Lookup(h))
			}
			if c := slices.Clone(got); len(slices.Compact(slices.Sorted(slices.Values(c)))) != len(got) {
				t.Fatalf("Preference(%d, %d) = %v has duplicates", h, n, got)
			}
			if other := again.Preference(h, n); !slices.Equal(got, other) {
				t.Fatalf("Preference(%d, %d) = %v from one build, %v from another", h, n, got, other)
			}
		}
	}
	if got := tbl.Preference(7, 0); len(got) != 0 {
		t.Errorf("Preference(7, 0) = %v, want none", got)
	}
	if got := tbl.Preference(7, -1); len(got) != 0 {
		t.Errorf("Preference(7, -1) = %v, want none", got)
	}
}

func TestPreferenceWalksForward(t *testing.T) {
	tbl := mustBuild(t, backendKeys(4), 0)
	m := tbl.Size()
	// Hashes near the end of the table make the walk wrap around.
	for _, h := range append(randomHashes(200), m-1, m-2, m-3, 2*m-1) {
		var want []int
		for s := h % m; len(want) < 4; s = (s + 1) % m {
			if b := tbl.slot(s); !slices.Contains(want, b) {
				want = append(want, b)
			}
		}
		if got := tbl.Preference(h, 4); !slices.Equal(got, want) {
			t.Fatalf("Preference(%d, 4) = %v, want %v", h, got, want)
		}
	}
}

func TestPreferenceLargePool(t *testing.T) {
	tbl := mustBuild(t, backendKeys(1500), 0)
	got := tbl.Preference(12345, 1500)
	if len(got) != 1500 || got[0] != tbl.Lookup(12345) {
		t.Fatalf("Preference over 1500 backends: len %d, first %d", len(got), got[0])
	}
	if len(slices.Compact(slices.Sorted(slices.Values(got)))) != 1500 {
		t.Errorf("Preference over 1500 backends has duplicates")
	}
}

func TestAllocations(t *testing.T) {
	tbl := mustBuild(t, backendKeys(1000), 0)
	dst := make([]int, 0, 8)
	var sink int
	if a := testing.AllocsPerRun(100, func() { sink += tbl.Lookup(uint64(sink) + 99) }); a != 0 {
		t.Errorf("Lookup allocates %.1f times", a)
	}
	if a := testing.AllocsPerRun(100, func() { dst = tbl.AppendPreference(dst[:0], uint64(sink), 8) }); a != 0 {
		t.Errorf("AppendPreference allocates %.1f times", a)
	}
}

func TestConcurrentLookup(t *testing.T) {
	tbl := mustBuild(t, backendKeys(20), 0)
	want := tbl.Preference(42, 5)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			dst := make([]int, 0, 5)
			for h := range uint64(10000) {
				tbl.Lookup(h)
				dst = tbl.AppendPreference(dst[:0], h, 5)
			}
			if got := tbl.Preference(42, 5); !slices.Equal(got, want) {
				t.Errorf("Preference(42, 5) = %v, want %v", got, want)
			}
		})
	}
	wg.Wait()
}

var sinkInt int

func BenchmarkLookup(b *testing.B) {
	tbl := mustBuild(b, backendKeys(100), 0)
	b.ReportAllocs()
	h := uint64(0x9e3779b97f4a7c15)
	for b.Loop() {
		sinkInt += tbl.Lookup(h)
		h += 0x9e3779b97f4a7c15
	}
}

func BenchmarkAppendPreference3(b *testing.B) {
	tbl := mustBuild(b, backendKeys(100), 0)
	dst := make([]int, 0, 3)
	b.ReportAllocs()
	h := uint64(0x9e3779b97f4a7c15)
	for b.Loop() {
		dst = tbl.AppendPreference(dst[:0], h, 3)
		h += 0x9e3779b97f4a7c15
	}
}
