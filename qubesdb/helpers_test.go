package qubesdb

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// testContext bounds a test so that a bug fails it instead of hanging it.
func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// logBuffer collects log output from several goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func testLogger() (*slog.Logger, *logBuffer) {
	buf := &logBuffer{}
	return slog.New(slog.NewTextHandler(buf, nil)), buf
}

// pipes stands in for the vchan: each VM connect gets one end of a fresh
// net.Pipe once the test allowed a connection, and dom0's accept (or the
// test playing dom0) gets the other end.
type pipes struct {
	tokens chan struct{}
	dom0   chan net.Conn
}

func newPipes(allowed int) *pipes {
	p := &pipes{tokens: make(chan struct{}, 100), dom0: make(chan net.Conn)}
	p.allow(allowed)
	return p
}

func (p *pipes) allow(n int) {
	for range n {
		p.tokens <- struct{}{}
	}
}

func (p *pipes) connect(ctx context.Context) (io.ReadWriteCloser, error) {
	select {
	case <-p.tokens:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	vm, dom0 := net.Pipe()
	select {
	case p.dom0 <- dom0:
		return vm, nil
	case <-ctx.Done():
		vm.Close()
		dom0.Close()
		return nil, ctx.Err()
	}
}

func (p *pipes) accept(ctx context.Context) (io.ReadWriteCloser, error) {
	select {
	case c := <-p.dom0:
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// nextConn is accept for a test that plays dom0 itself.
func (p *pipes) nextConn(t *testing.T, ctx context.Context) net.Conn {
	t.Helper()
	select {
	case c := <-p.dom0:
		t.Cleanup(func() { c.Close() })
		return c
	case <-ctx.Done():
		require.FailNow(t, "no connection from the VM side")
		return nil
	}
}

// runAsync runs f in a goroutine; the returned channel yields its error.
func runAsync(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

// wait returns what ch yields, failing the test if ctx ends first.
func wait[T any](t *testing.T, ctx context.Context, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-ctx.Done():
		require.FailNow(t, "timed out", "%v", ctx.Err())
		var zero T
		return zero
	}
}

var discardLogger = slog.New(slog.DiscardHandler)
