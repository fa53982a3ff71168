// Command gateway-guest-init is /init of the tool-run microVM's initramfs
// (hack/microvm-guest.sh): see package guest.
package main

import "github.com/agent-gateway/gateway-operator/nodeagent/microvm/guest"

func main() { guest.Run() }
