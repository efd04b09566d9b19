// Command qfw is the Qubes OS firewall VM program: it runs the userspace
// packet engine (package firewall) between client qubes and the uplink, with
// the rules that dom0 writes to QubesDB.
//
//	qfw -platform tap -uplink TAP -client TAP=IPv4[,IPv6] [-client ...] -qubesdb FILE
//
// FILE is the firewall VM's QubesDB as a JSON object of path -> value. A
// client address's rules (/qubes-firewall/<ip>/...) load when its commit key
// /qubes-firewall/<ip> is present; until then that address is blocked. SIGHUP
// re-reads FILE and reloads every committed address, as a rule edit in the
// Qubes GUI does. dsthost names are resolved through the engine and the
// uplink, with this VM's DNS servers (/qubes-primary-dns, -secondary-dns).
// Client DNS queries to /qubes-netvm-primary-dns and -secondary-dns (port
// 53, UDP and TCP) are redirected to those servers when they differ, as
// qubes-setup-dnat-to-ns does in a Linux sys-firewall.
//
// Flags may come before or after positional arguments. Logs go to stderr
// (log/slog text): start-up summary, each rule load with its result, a
// per-client summary of rejected flows at most every few seconds, errors.
// Exit status: 0 after SIGTERM/SIGINT, 2 for bad flags, 1 for any other
// failure, with a one-line message.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// options are the parsed command line.
type options struct {
	platform string
	uplink   string
	clients  clientList
	qubesdb  string
}

// platforms are the platforms this build has; the others print why not.
var platforms = map[string]func(ctx context.Context, opts *options, hup <-chan os.Signal, log *slog.Logger) error{
	"tap": runTap,
}

const usage = `usage: qfw -platform tap -uplink TAP -client TAP=IPv4[,IPv6] [-client ...] -qubesdb FILE

  -platform tap   run the engine on Linux TAP devices (opened, or created, in
                  the current network namespace; they may be moved afterwards)
  -uplink TAP     the TAP towards sys-net
  -client TAP=IPv4[,IPv6]
                  a client qube's TAP and addresses (repeatable)
  -qubesdb FILE   JSON object of QubesDB path -> value (this VM's database as
                  dom0 writes it); SIGHUP re-reads it as a QubesDB update
`

// usageError is a command-line mistake: exit status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }

func run(args []string, stderr io.Writer) int {
	// SIGHUP is caught before anything else: its default action would kill
	// the firewall when a reload is requested early.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	opts, err := parseArgs(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stderr, usage)
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "qfw: %s (qfw -h for usage)\n", oneLine(err))
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	if err := platforms[opts.platform](ctx, opts, hup, log); err != nil {
		fmt.Fprintf(stderr, "qfw: %s\n", oneLine(err))
		return 1
	}
	return 0
}

// parseArgs reads the command line; flags may follow positional arguments.
func parseArgs(args []string) (*options, error) {
	opts := &options{}
	fs := flag.NewFlagSet("qfw", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported once, on one line, by run
	fs.StringVar(&opts.platform, "platform", "xen", "")
	fs.StringVar(&opts.uplink, "uplink", "", "")
	fs.Var(&opts.clients, "client", "")
	fs.StringVar(&opts.qubesdb, "qubesdb", "", "")
	positional, err := parseInterleaved(fs, args)
	if err != nil {
		return nil, err
	}
	if len(positional) > 0 {
		return nil, fmt.Errorf("unexpected argument %q", positional[0])
	}
	if platforms[opts.platform] == nil {
		return nil, fmt.Errorf("platform %q is not available in this build (available: tap)", opts.platform)
	}
	return opts, opts.checkTap()
}

// parseInterleaved parses flags anywhere among the arguments and returns the
// positional ones in order; everything after "--" is positional.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(positional, rest...), nil
		}
		if len(rest) == 0 {
			return positional, nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// checkTap checks the flags that -platform tap needs.
func (o *options) checkTap() error {
	if o.uplink == "" {
		return errors.New("-uplink TAP is required")
	}
	if o.qubesdb == "" {
		return errors.New("-qubesdb FILE is required")
	}
	for _, c := range o.clients {
		if c.tap == o.uplink {
			return fmt.Errorf("TAP %q is both the uplink and a client", c.tap)
		}
	}
	return nil
}

// oneLine keeps an error (errors.Join puts one per line) on a single line.
func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", "; ")
}
