package sim_test

import (
	"context"
	"fmt"
	"io"
	"time"

	"qfw/xen"
	"qfw/xen/sim"
	"qfw/xen/vchan"
)

// A QubesDB-style link: dom0 serves vchan port 111 for a VM, the VM connects.
func Example_vchan() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h := sim.New()
	defer h.Close()
	vm, err := h.CreateDomain("sys-firewall")
	if err != nil {
		panic(err)
	}
	srv, err := vchan.Listen(ctx, h.Dom0(), vm.ID(), 111, 4096, 4096)
	if err != nil {
		panic(err)
	}
	defer srv.Close()
	cli, err := vchan.Dial(ctx, vm, xen.Dom0, 111)
	if err != nil {
		panic(err)
	}

	var _ io.ReadWriteCloser = cli
	if _, err := cli.Write([]byte("hello dom0")); err != nil {
		panic(err)
	}
	buf := make([]byte, 64)
	n, _ := srv.Read(buf)
	fmt.Println(string(buf[:n]))

	cli.Close()
	_, err = srv.Read(buf)
	fmt.Println(err)
	// Output:
	// hello dom0
	// EOF
}
