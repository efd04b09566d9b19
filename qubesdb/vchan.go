package qubesdb

import (
	"context"
	"io"

	"qfw/xen"
	"qfw/xen/vchan"
)

// VchanPort is the vchan port of the QubesDB link between dom0 and a VM;
// dom0 serves it with 4096-byte rings in both directions, which hold any
// whole message (72 + 3071 bytes).
const (
	VchanPort = 111
	vchanRing = 4096
)

// DialDom0 returns the Connect of a VM's Client: a vchan client of dom0's
// QubesDB port.
func DialDom0(vm xen.Domain) Connect {
	return func(ctx context.Context) (io.ReadWriteCloser, error) {
		c, err := vchan.Dial(ctx, vm, xen.Dom0, VchanPort)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// ListenVM returns the Connect of dom0's Server for one VM: a vchan server
// on the QubesDB port, as dom0's qubesdb-daemon creates.
func ListenVM(dom0 xen.Domain, vm xen.DomID) Connect {
	return func(ctx context.Context) (io.ReadWriteCloser, error) {
		c, err := vchan.Listen(ctx, dom0, vm, VchanPort, vchanRing, vchanRing)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}
