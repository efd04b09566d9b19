package xen

import (
	"sync/atomic"
	"unsafe"
)

// Word returns the 32-bit word at byte offset off of shared memory b for
// atomic access. Go atomics are sequentially consistent, which covers the
// barriers of the C protocols. off must be 4-aligned within a 4-aligned page;
// a violation is a programming error and panics.
func Word(b []byte, off int) *atomic.Uint32 {
	p := unsafe.Pointer(&b[off : off+4 : off+4][0])
	if uintptr(p)%4 != 0 {
		panic("xen: shared word is not 4-byte aligned")
	}
	return (*atomic.Uint32)(p)
}

// maxByteCAS bounds StoreByte's retries: a hostile peer rewriting the other
// bytes of the word forever must not stall us forever.
const maxByteCAS = 1 << 16

// StoreByte atomically sets the byte at off of shared memory b without
// disturbing the other bytes of its word (the peer writes those). It reports
// false if the word kept changing under it.
func StoreByte(b []byte, off int, v byte) bool {
	ok, _ := swapByte(b, off, func(byte) bool { return true }, v)
	return ok
}

// CompareAndSwapByte atomically replaces the byte at off of shared memory b
// by new if it holds old. It reports whether it did; contended reports that
// the word kept changing under it.
func CompareAndSwapByte(b []byte, off int, old, new byte) (swapped, contended bool) {
	swapped, done := swapByte(b, off, func(cur byte) bool { return cur == old }, new)
	return swapped, !done
}

// swapByte stores v in byte off if cond holds for its current value. done
// is false if the word changed under every attempt.
func swapByte(b []byte, off int, cond func(byte) bool, v byte) (stored, done bool) {
	w := Word(b, off&^3)
	shift := uint(off&3) * 8 // little-endian byte order
	for range maxByteCAS {
		cur := w.Load()
		if !cond(byte(cur >> shift)) {
			return false, true
		}
		if w.CompareAndSwap(cur, cur&^(0xff<<shift)|uint32(v)<<shift) {
			return true, true
		}
	}
	return false, false
}

// LoadByte atomically reads the byte at off of shared memory b.
func LoadByte(b []byte, off int) byte {
	return byte(Word(b, off&^3).Load() >> (uint(off&3) * 8))
}
