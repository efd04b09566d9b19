package qubesdb

import (
	"context"
	"testing"
	"time"
)

// testContext bounds a test so that a bug fails it instead of hanging it.
func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}
