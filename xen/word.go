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
	w := Word(b, off&^3)
	shift := uint(off&3) * 8 // little-endian byte order
	for range maxByteCAS {
		old := w.Load()
		if w.CompareAndSwap(old, old&^(0xff<<shift)|uint32(v)<<shift) {
			return true
		}
	}
	return false
}

// LoadByte atomically reads the byte at off of shared memory b.
func LoadByte(b []byte, off int) byte {
	return byte(Word(b, off&^3).Load() >> (uint(off&3) * 8))
}
