package evq

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestFIFO(t *testing.T) {
	ctx := testContext(t)
	q := New[int](4)
	for i := range 3 {
		q.Push(i)
	}
	for i := range 3 {
		v, overflow, err := q.Pop(ctx)
		require.NoError(t, err)
		assert.False(t, overflow)
		assert.Equal(t, i, v)
	}
}

func TestOverflowDropsAndReports(t *testing.T) {
	ctx := testContext(t)
	q := New[int](3)
	for i := range 5 { // 0,1,2 fill it; 3 overflows; 4 follows
		q.Push(i)
	}
	_, overflow, err := q.Pop(ctx)
	require.NoError(t, err)
	assert.True(t, overflow, "first Pop after an overflow must report it")
	for _, want := range []int{3, 4} {
		v, overflow, err := q.Pop(ctx)
		require.NoError(t, err)
		assert.False(t, overflow)
		assert.Equal(t, want, v)
	}
	assert.Len(t, q.ring, 3, "storage must stay bounded")
}

func TestBoundedUnderFlood(t *testing.T) {
	q := New[int](8)
	for i := range 100000 {
		q.Push(i)
	}
	assert.Len(t, q.ring, 8)
	assert.Equal(t, 8, q.n)
}

func TestPopWaitsForPush(t *testing.T) {
	ctx := testContext(t)
	q := New[string](2)
	got := make(chan string)
	go func() {
		v, _, err := q.Pop(ctx)
		if err != nil {
			v = err.Error()
		}
		got <- v
	}()
	q.Push("x")
	select {
	case v := <-got:
		assert.Equal(t, "x", v)
	case <-ctx.Done():
		t.Fatal("Pop did not return after Push")
	}
}

func TestPopContext(t *testing.T) {
	ctx, cancel := context.WithCancel(testContext(t))
	cancel()
	q := New[int](1)
	_, _, err := q.Pop(ctx)
	assert.ErrorIs(t, err, context.Canceled)
}

func TestClose(t *testing.T) {
	ctx := testContext(t)
	q := New[int](0) // clamped to 1
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			_, _, err := q.Pop(ctx)
			errs <- err
		}()
	}
	q.Close()
	q.Close()
	for range 2 {
		select {
		case err := <-errs:
			assert.ErrorIs(t, err, ErrClosed)
		case <-ctx.Done():
			t.Fatal("Close did not wake every Pop")
		}
	}
	q.Push(1)
	_, _, err := q.Pop(ctx)
	assert.ErrorIs(t, err, ErrClosed)
}

func BenchmarkPushPop(b *testing.B) {
	ctx := context.Background()
	q := New[int](64)
	b.ReportAllocs()
	for b.Loop() {
		q.Push(1)
		if _, _, err := q.Pop(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
