// Command kubectl-gateway is the `kubectl gateway` plugin: put it on PATH and run
// `kubectl gateway --help`.
package main

import (
	"os"

	"github.com/agent-gateway/gateway-operator/cli"
)

func main() { os.Exit(cli.Main()) }
