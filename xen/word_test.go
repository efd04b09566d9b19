package xen_test

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/xen"
)

func TestSharedBytes(t *testing.T) {
	page := make([]byte, xen.PageSize)
	w := xen.Word(page, 20)
	w.Store(0x04030201)

	require.True(t, xen.StoreByte(page, 22, 0xaa))
	assert.Equal(t, uint32(0x04aa0201), w.Load(), "only byte 22 changes")
	assert.Equal(t, byte(0xaa), xen.LoadByte(page, 22))
	assert.Equal(t, byte(0x04), xen.LoadByte(page, 23))
	assert.Equal(t, []byte{1, 2, 0xaa, 4}, page[20:24], "little-endian bytes in memory")

	swapped, contended := xen.CompareAndSwapByte(page, 21, 2, 7)
	assert.True(t, swapped)
	assert.False(t, contended)
	swapped, contended = xen.CompareAndSwapByte(page, 21, 2, 9)
	assert.False(t, swapped, "byte no longer holds 2")
	assert.False(t, contended)
	assert.Equal(t, uint32(0x04aa0701), w.Load())

	assert.Panics(t, func() { xen.Word(page, 2) }, "misaligned word is a programming error")
	assert.Panics(t, func() { xen.Word(page, xen.PageSize-2) }, "out of range")
}

func TestGrantStatus(t *testing.T) {
	assert.NoError(t, xen.GrantOkay.Err())
	err := xen.GrantPermissionDenied.Err()
	assert.EqualError(t, err, "grant permission denied")
	assert.True(t, errors.Is(err, xen.GrantPermissionDenied))
	assert.False(t, errors.Is(err, xen.GrantBadRef))
	assert.EqualError(t, xen.GrantNoSpace, "grant no space")
	assert.EqualError(t, xen.GrantStatus(-99), "grant status -99")
	assert.EqualError(t, xen.GrantStatus(3), "grant status 3")
}
