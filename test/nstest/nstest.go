// Package nstest gives tests throw-away Linux network namespaces: created,
// entered and configured from Go, and removed with everything in them when
// the test ends, even when it fails. It needs root.
package nstest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// RequireRoot skips the test unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and TAP devices (CI runs as root)")
	}
}

// NS is a named network namespace (visible to `ip netns`).
type NS struct {
	Name   string
	handle netns.NsHandle
	// Netlink configures links, addresses, routes and neighbours inside it.
	Netlink *netlink.Handle
}

var seq atomic.Int64

// New creates a namespace with loopback up. It is deleted when the test ends,
// which also destroys the virtual interfaces left in it.
func New(t testing.TB, role string) *NS {
	t.Helper()
	RequireRoot(t)
	// Named namespaces are global: the pid keeps parallel test binaries apart.
	ns := &NS{Name: fmt.Sprintf("qfw%d-%s%d", os.Getpid(), role, seq.Add(1))}
	err := onLockedThread(func() error {
		h, err := netns.NewNamed(ns.Name)
		ns.handle = h
		return err
	})
	if err != nil {
		t.Fatalf("create namespace %s: %v", ns.Name, err)
	}
	t.Cleanup(func() {
		if ns.Netlink != nil {
			ns.Netlink.Close()
		}
		ns.handle.Close()
		if err := netns.DeleteNamed(ns.Name); err != nil {
			t.Errorf("delete namespace %s: %v", ns.Name, err)
		}
	})
	ns.Netlink, err = netlink.NewHandleAt(ns.handle)
	if err != nil {
		t.Fatalf("netlink in %s: %v", ns.Name, err)
	}
	lo, err := ns.Netlink.LinkByName("lo")
	if err == nil {
		err = ns.Netlink.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("loopback up in %s: %v", ns.Name, err)
	}
	return ns
}

// Do runs fn on an OS thread inside the namespace. Sockets and TAP devices
// opened by fn stay in the namespace and may be used from any goroutine.
func (ns *NS) Do(fn func() error) error {
	return onLockedThread(func() error {
		if err := netns.Set(ns.handle); err != nil {
			return fmt.Errorf("enter namespace %s: %w", ns.Name, err)
		}
		return fn()
	})
}

// Command runs a program inside the namespace; ctx bounds its run time.
func (ns *NS) Command(ctx context.Context, program string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name, program}, args...)...)
}

// MoveLink moves the interface called name from this namespace into to.
func (ns *NS) MoveLink(name string, to *NS) error {
	link, err := ns.Netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", name, ns.Name, err)
	}
	if err := ns.Netlink.LinkSetNsFd(link, int(to.handle)); err != nil {
		return fmt.Errorf("move %s from %s to %s: %w", name, ns.Name, to.Name, err)
	}
	return nil
}

// onLockedThread runs fn on a fresh OS thread that is thrown away afterwards,
// so a namespace switch never leaks to other goroutines.
func onLockedThread(fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		done <- fn()
	}()
	return <-done
}
