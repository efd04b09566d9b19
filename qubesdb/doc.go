// Package qubesdb speaks the QubesDB protocol of Qubes OS (spec qubes.md
// section 1) and reads what dom0 writes there for a firewall VM.
//
//   - The codec: [Header], [ReadMessage], [WriteMessage], and the checks the
//     reference daemon applies ([CheckPath], [CheckKey], [CheckValue],
//     [CheckVchan]).
//   - [DB], an in-memory database with the daemon's semantics, limits, and
//     prefix or exact watches whose queues are bounded (a slow watcher gets
//     [OpOverflow], never an unbounded backlog).
//   - Typed readers: [ReadConfig] for the uplink, the provided network,
//     connected-ips and mapped-ip keys; [FirewallRules], [FirewallClients]
//     and [WatchFirewall] for the rule trees and their commit keys.
//   - [Client], the VM side of the vchan link to dom0 (what the VM's
//     qubesdb-daemon does, and what a unikernel firewall must do itself),
//     and [Server], dom0's side, for tests and the simulated platform. Both
//     run over any io.ReadWriteCloser; [DialDom0] and [ListenVM] open the
//     vchan on port 111.
//
// Package qubesdb/local talks to a VM's daemon over its unix socket instead
// and can mirror it into a DB, for the kernel data plane in a Linux qube.
//
// Everything a peer sends is untrusted: messages are bounded before
// anything is allocated and validated before they touch a database, and a
// peer that breaks the protocol loses its link, never the process.
package qubesdb
