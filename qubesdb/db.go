package qubesdb

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Entry is one key and its value.
type Entry struct {
	Path  string
	Value string
}

// Limits bound a DB, whose content comes from an untrusted peer.
type Limits struct {
	MaxEntries int // number of entries
	MaxBytes   int // sum of the lengths of all paths and values
}

// DefaultLimits is generous for a firewall VM (tens of clients with hundreds
// of rules each) and still small next to its 32 MB of RAM.
var DefaultLimits = Limits{MaxEntries: 16384, MaxBytes: 4 << 20}

// ErrFull is wrapped by errors from writes that would exceed the Limits.
var ErrFull = errors.New("QubesDB limits exceeded")

// DB is an in-memory QubesDB: entries sorted by path as the daemon keeps
// them, with watches. It is safe for concurrent use.
type DB struct {
	limits Limits

	mu      sync.RWMutex
	entries []Entry // sorted by Path, unique
	bytes   int
	watches map[*Watch]struct{}
}

// NewDB returns an empty database; zero fields of limits take their value
// from DefaultLimits.
func NewDB(limits Limits) *DB {
	if limits.MaxEntries <= 0 {
		limits.MaxEntries = DefaultLimits.MaxEntries
	}
	if limits.MaxBytes <= 0 {
		limits.MaxBytes = DefaultLimits.MaxBytes
	}
	return &DB{limits: limits, watches: make(map[*Watch]struct{})}
}

func comparePath(e Entry, path string) int { return strings.Compare(e.Path, path) }

// prefixRange returns the index range of the entries whose path starts with
// prefix: they are contiguous in sorted order.
func (db *DB) prefixRange(prefix string) (int, int) {
	start, _ := slices.BinarySearchFunc(db.entries, prefix, comparePath)
	end := start
	for end < len(db.entries) && strings.HasPrefix(db.entries[end].Path, prefix) {
		end++
	}
	return start, end
}

// Read returns the value of path.
func (db *DB) Read(path string) (string, bool) {
	db.mu.RLock()
	defer db.mu.RUnlock()
	i, ok := slices.BinarySearchFunc(db.entries, path, comparePath)
	if !ok {
		return "", false
	}
	return db.entries[i].Value, true
}

// Multiread returns, in ascending order, the entries whose path starts with
// prefix (a plain byte prefix: end it with '/' to select a subtree).
func (db *DB) Multiread(prefix string) []Entry {
	db.mu.RLock()
	defer db.mu.RUnlock()
	start, end := db.prefixRange(prefix)
	return slices.Clone(db.entries[start:end])
}

// Len returns the number of entries.
func (db *DB) Len() int {
	db.mu.RLock()
	defer db.mu.RUnlock()
	return len(db.entries)
}

// Write creates or replaces an entry and fires the watches, even when the
// value did not change.
func (db *DB) Write(path, value string) error {
	if err := CheckKey(path); err != nil {
		return err
	}
	if err := CheckValue(value); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	db.mu.Lock()
	defer db.mu.Unlock()
	i, exists := slices.BinarySearchFunc(db.entries, path, comparePath)
	size := db.bytes + len(value)
	if exists {
		size -= len(db.entries[i].Value)
	} else {
		size += len(path)
		if len(db.entries) >= db.limits.MaxEntries {
			return fmt.Errorf("write %q: %w: %d entries", path, ErrFull, len(db.entries))
		}
	}
	if size > db.limits.MaxBytes {
		return fmt.Errorf("write %q: %w: %d bytes", path, ErrFull, size)
	}
	if exists {
		db.entries[i].Value = value
	} else {
		db.entries = slices.Insert(db.entries, i, Entry{Path: path, Value: value})
	}
	db.bytes = size
	db.fire(Event{Op: OpWrite, Path: path})
	return nil
}

// Rm removes path, or every entry under it if it ends with '/', and fires
// the watches with the given path. It reports whether anything was removed;
// when nothing was, no watch fires.
func (db *DB) Rm(path string) (bool, error) {
	if err := CheckRmPath(path); err != nil {
		return false, err
	}
	db.mu.Lock()
	defer db.mu.Unlock()
	var start, end int
	if strings.HasSuffix(path, "/") {
		start, end = db.prefixRange(path)
	} else if i, ok := slices.BinarySearchFunc(db.entries, path, comparePath); ok {
		start, end = i, i+1
	}
	if start == end {
		return false, nil
	}
	for _, e := range db.entries[start:end] {
		db.bytes -= len(e.Path) + len(e.Value)
	}
	db.entries = slices.Delete(db.entries, start, end)
	db.fire(Event{Op: OpRm, Path: path})
	return true, nil
}

// Replace makes entries the whole content of the database, as a sync from
// the peer does, atomically: a reader never sees half of it. Watches fire
// OpRm for every entry that disappeared, then OpWrite for every entry of the
// new content in descending order, the order dom0 sends a sync in (a firewall
// subtree before its commit key).
func (db *DB) Replace(entries []Entry) error {
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b Entry) int { return strings.Compare(a.Path, b.Path) })
	size := 0
	for i, e := range sorted {
		if err := CheckKey(e.Path); err != nil {
			return err
		}
		if err := CheckValue(e.Value); err != nil {
			return fmt.Errorf("entry %q: %w", e.Path, err)
		}
		if i > 0 && sorted[i-1].Path == e.Path {
			return fmt.Errorf("%w: entry %q appears twice", ErrInvalid, e.Path)
		}
		size += len(e.Path) + len(e.Value)
	}
	if len(sorted) > db.limits.MaxEntries || size > db.limits.MaxBytes {
		return fmt.Errorf("%w: %d entries of %d bytes", ErrFull, len(sorted), size)
	}

	db.mu.Lock()
	defer db.mu.Unlock()
	old := db.entries
	db.entries, db.bytes = sorted, size
	for _, e := range old {
		if _, ok := slices.BinarySearchFunc(sorted, e.Path, comparePath); !ok {
			db.fire(Event{Op: OpRm, Path: e.Path})
		}
	}
	for i := len(sorted) - 1; i >= 0; i-- {
		db.fire(Event{Op: OpWrite, Path: sorted[i].Path})
	}
	return nil
}
