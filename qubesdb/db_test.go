package qubesdb

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func paths(entries []Entry) []string {
	var out []string
	for _, e := range entries {
		out = append(out, e.Path)
	}
	return out
}

func mustWrite(t testing.TB, db *DB, kv ...string) {
	t.Helper()
	for i := 0; i < len(kv); i += 2 {
		require.NoError(t, db.Write(kv[i], kv[i+1]))
	}
}

func TestDBReadWrite(t *testing.T) {
	db := NewDB(Limits{})
	_, ok := db.Read("/qubes-ip")
	assert.False(t, ok)
	mustWrite(t, db, "/qubes-ip", "10.137.0.6", "/empty", "")
	v, ok := db.Read("/qubes-ip")
	assert.True(t, ok)
	assert.Equal(t, "10.137.0.6", v)
	v, ok = db.Read("/empty")
	assert.True(t, ok, "empty values are legal")
	assert.Equal(t, "", v)
	mustWrite(t, db, "/qubes-ip", "10.137.0.7")
	v, _ = db.Read("/qubes-ip")
	assert.Equal(t, "10.137.0.7", v)
	assert.Equal(t, 2, db.Len())
}

func TestDBWriteRejects(t *testing.T) {
	db := NewDB(Limits{})
	for _, p := range []string{"", "/", "x", "/a/", "/a b", "-a", "/" + strings.Repeat("a", 63)} {
		assert.ErrorIs(t, db.Write(p, "v"), ErrInvalid, "%q", p)
	}
	assert.ErrorIs(t, db.Write("/a", "x\x00"), ErrInvalid)
	assert.ErrorIs(t, db.Write("/a", strings.Repeat("x", MaxValueLen+1)), ErrInvalid)
	assert.Equal(t, 0, db.Len())
}

func TestDBMultireadIsSortedBytePrefix(t *testing.T) {
	db := NewDB(Limits{})
	mustWrite(t, db, "/a/bc", "1", "/a/b/x", "2", "/a/b", "3", "/b", "4", "/a", "5", "/a/b/a", "6")
	assert.Equal(t, []string{"/a/b", "/a/b/a", "/a/b/x", "/a/bc"}, paths(db.Multiread("/a/b")))
	assert.Equal(t, []string{"/a/b/a", "/a/b/x"}, paths(db.Multiread("/a/b/")))
	assert.Equal(t, []string{"/a", "/a/b", "/a/b/a", "/a/b/x", "/a/bc", "/b"}, paths(db.Multiread("")))
	assert.Empty(t, db.Multiread("/c"))
	got := db.Multiread("/b")
	got[0].Value = "changed"
	v, _ := db.Read("/b")
	assert.Equal(t, "4", v, "Multiread must return a copy")
}

func TestDBRm(t *testing.T) {
	db := NewDB(Limits{})
	mustWrite(t, db,
		"/qubes-firewall/10.137.0.3", "",
		"/qubes-firewall/10.137.0.3/0000", "action=accept",
		"/qubes-firewall/10.137.0.3/policy", "drop",
		"/qubes-firewall/10.137.0.30/policy", "drop")

	removed, err := db.Rm("/qubes-firewall/10.137.0.3/")
	require.NoError(t, err)
	assert.True(t, removed)
	assert.Equal(t, []string{"/qubes-firewall/10.137.0.3", "/qubes-firewall/10.137.0.30/policy"},
		paths(db.Multiread("/")), "subtree RM keeps the commit key and the sibling")

	removed, err = db.Rm("/qubes-firewall/10.137.0.3/")
	require.NoError(t, err)
	assert.False(t, removed, "nothing left to remove")

	removed, err = db.Rm("/qubes-firewall/10.137.0.3")
	require.NoError(t, err)
	assert.True(t, removed)
	removed, err = db.Rm("/qubes-firewall/10.137.0")
	require.NoError(t, err)
	assert.False(t, removed, "exact RM is not a prefix RM")

	_, err = db.Rm("")
	assert.ErrorIs(t, err, ErrInvalid)
	_, err = db.Rm("a/")
	assert.ErrorIs(t, err, ErrInvalid)

	removed, err = db.Rm("/")
	require.NoError(t, err)
	assert.True(t, removed)
	assert.Equal(t, 0, db.Len())
	assert.Equal(t, 0, db.bytes)
}

func TestDBLimits(t *testing.T) {
	db := NewDB(Limits{MaxEntries: 2, MaxBytes: 20})
	mustWrite(t, db, "/a", "12345", "/b", "")
	assert.ErrorIs(t, db.Write("/c", ""), ErrFull, "third entry")
	assert.ErrorIs(t, db.Write("/a", strings.Repeat("x", 17)), ErrFull, "bytes")
	mustWrite(t, db, "/a", strings.Repeat("x", 16)) // 2+16+2 = 20
	_, err := db.Rm("/b")
	require.NoError(t, err)
	mustWrite(t, db, "/a", "")
	mustWrite(t, db, "/c", "123456789012345")
	assert.ErrorIs(t, db.Replace([]Entry{{"/a", ""}, {"/b", ""}, {"/c", ""}}), ErrFull)
	assert.ErrorIs(t, db.Replace([]Entry{{"/a", strings.Repeat("x", 19)}}), ErrFull)
}

func TestDBReplace(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	mustWrite(t, db, "/gone", "1", "/kept", "old")
	w, err := db.Watch("/")
	require.NoError(t, err)
	defer w.Close()

	require.NoError(t, db.Replace([]Entry{
		{"/kept", "new"},
		{"/qubes-firewall/10.137.0.3", ""},
		{"/qubes-firewall/10.137.0.3/policy", "drop"},
	}))
	assert.Equal(t, []Entry{
		{"/kept", "new"},
		{"/qubes-firewall/10.137.0.3", ""},
		{"/qubes-firewall/10.137.0.3/policy", "drop"},
	}, db.Multiread(""))

	var got []Event
	for range 4 {
		ev, err := w.Next(ctx)
		require.NoError(t, err)
		got = append(got, ev)
	}
	assert.Equal(t, []Event{
		{OpRm, "/gone"},
		{OpWrite, "/qubes-firewall/10.137.0.3/policy"},
		{OpWrite, "/qubes-firewall/10.137.0.3"},
		{OpWrite, "/kept"},
	}, got, "removals first, then the new content in descending order")
}

func TestDBReplaceRejectsAndKeepsContent(t *testing.T) {
	db := NewDB(Limits{})
	mustWrite(t, db, "/a", "1")
	for _, bad := range [][]Entry{
		{{"/x", "1"}, {"/x", "2"}},
		{{"/x/", "1"}},
		{{"/x", "\x00"}},
	} {
		assert.ErrorIs(t, db.Replace(bad), ErrInvalid, "%v", bad)
	}
	assert.Equal(t, []Entry{{"/a", "1"}}, db.Multiread(""))
}

func nextEvent(t *testing.T, ctx context.Context, w *Watch) Event {
	t.Helper()
	ev, err := w.Next(ctx)
	require.NoError(t, err)
	return ev
}

func TestWatchMatching(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	exact, err := db.Watch("/qubes-firewall/10.137.0.3")
	require.NoError(t, err)
	prefix, err := db.Watch("/qubes-firewall/")
	require.NoError(t, err)
	multi, err := db.Watch("/connected-ips", "/qubes-firewall/", "/qubes-firewall/10.137.0.3")
	require.NoError(t, err)

	mustWrite(t, db,
		"/qubes-firewall/10.137.0.3/0000", "action=accept",
		"/qubes-firewall/10.137.0.3", "",
		"/qubes-firewall/10.137.0.30", "",
		"/qubes-firewall", "not under the prefix",
		"/connected-ips", "10.137.0.3",
		"/connected-ips6", "")
	_, err = db.Rm("/qubes-firewall/10.137.0.3/")
	require.NoError(t, err)
	_, err = db.Rm("/nothing/")
	require.NoError(t, err)
	mustWrite(t, db, "/qubes-firewall/10.137.0.3", "") // unchanged value still fires

	assert.Equal(t, Event{OpWrite, "/qubes-firewall/10.137.0.3"}, nextEvent(t, ctx, exact))
	assert.Equal(t, Event{OpWrite, "/qubes-firewall/10.137.0.3"}, nextEvent(t, ctx, exact))

	want := []Event{
		{OpWrite, "/qubes-firewall/10.137.0.3/0000"},
		{OpWrite, "/qubes-firewall/10.137.0.3"},
		{OpWrite, "/qubes-firewall/10.137.0.30"},
		{OpRm, "/qubes-firewall/10.137.0.3/"},
		{OpWrite, "/qubes-firewall/10.137.0.3"},
	}
	for _, ev := range want {
		assert.Equal(t, ev, nextEvent(t, ctx, prefix))
	}
	want = slices.Insert(want, 3, Event{OpWrite, "/connected-ips"})
	for _, ev := range want {
		assert.Equal(t, ev, nextEvent(t, ctx, multi), "one event even when two patterns match")
	}

	// Nothing else is queued on any of them.
	short, cancel := context.WithCancel(ctx)
	cancel()
	for _, w := range []*Watch{exact, prefix, multi} {
		_, err := w.Next(short)
		assert.ErrorIs(t, err, context.Canceled)
	}
}

func TestWatchRejects(t *testing.T) {
	db := NewDB(Limits{})
	_, err := db.Watch()
	assert.Error(t, err)
	_, err = db.Watch("")
	assert.ErrorIs(t, err, ErrInvalid)
	_, err = db.Watch("/ok", "/bad path")
	assert.ErrorIs(t, err, ErrInvalid)
}

func TestWatchOverflowAndClose(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	w, err := db.Watch("/")
	require.NoError(t, err)
	for i := range WatchQueueLen + 5 {
		mustWrite(t, db, fmt.Sprintf("/k%d", i), "")
	}
	assert.Equal(t, Event{Op: OpOverflow}, nextEvent(t, ctx, w))
	for i := WatchQueueLen; i < WatchQueueLen+5; i++ {
		assert.Equal(t, Event{OpWrite, fmt.Sprintf("/k%d", i)}, nextEvent(t, ctx, w))
	}
	w.Close()
	_, err = w.Next(ctx)
	assert.ErrorIs(t, err, ErrClosed)
	mustWrite(t, db, "/after", "") // must not reach a closed watch
	assert.Empty(t, db.watches)
}

func TestOpString(t *testing.T) {
	assert.Equal(t, "write", OpWrite.String())
	assert.Equal(t, "rm", OpRm.String())
	assert.Equal(t, "overflow", OpOverflow.String())
	assert.Equal(t, "op(9)", Op(9).String())
}

// FuzzDB runs random operations against the DB and a plain map, and checks
// that they agree and that the byte accounting is exact.
func FuzzDB(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7})
	f.Add([]byte("\x00a\x01b\x02/\x03c\x04d"))
	f.Fuzz(func(t *testing.T, ops []byte) {
		db := NewDB(Limits{MaxEntries: 8, MaxBytes: 64})
		model := map[string]string{}
		keys := []string{"/a", "/a/b", "/a/c", "/ab", "/b", "/b/x/y", "/c", "/d", "/e"}
		for i := 0; i+1 < len(ops); i += 2 {
			k := keys[int(ops[i+1])%len(keys)]
			switch ops[i] % 3 {
			case 0:
				v := strings.Repeat("v", int(ops[i]>>2))
				if db.Write(k, v) == nil {
					model[k] = v
				}
			case 1:
				p := k
				if ops[i]&4 != 0 {
					p += "/"
				}
				removed, err := db.Rm(p)
				if err != nil {
					t.Fatal(err)
				}
				n := len(model)
				maps.DeleteFunc(model, func(mk, _ string) bool {
					return mk == p || strings.HasSuffix(p, "/") && strings.HasPrefix(mk, p)
				})
				if removed != (n != len(model)) {
					t.Fatalf("Rm(%q) reported %v", p, removed)
				}
			case 2:
				for _, e := range db.Multiread(k) {
					if !strings.HasPrefix(e.Path, k) || model[e.Path] != e.Value {
						t.Fatalf("Multiread(%q) returned %v", k, e)
					}
				}
			}
		}
		all := db.Multiread("")
		size := 0
		for _, e := range all {
			size += len(e.Path) + len(e.Value)
		}
		if len(all) != len(model) || size != db.bytes || size > 64 || len(all) > 8 {
			t.Fatalf("db has %d entries / %d bytes (accounted %d), model %d", len(all), size, db.bytes, len(model))
		}
		if !slices.IsSortedFunc(all, func(a, b Entry) int { return strings.Compare(a.Path, b.Path) }) {
			t.Fatal("entries not sorted")
		}
	})
}

func BenchmarkDBWriteWithWatch(b *testing.B) {
	db := NewDB(Limits{})
	for i := range 1000 {
		mustWrite(b, db, fmt.Sprintf("/qubes-firewall/10.137.0.%d/%04d", i%250, i), "action=accept")
	}
	w, err := db.Watch("/qubes-firewall/")
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	b.ReportAllocs()
	for b.Loop() {
		if err := db.Write("/qubes-firewall/10.137.0.3/0005", "action=accept proto=tcp"); err != nil {
			b.Fatal(err)
		}
	}
}
