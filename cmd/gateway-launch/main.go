// Command gateway-launch starts one gateway profile. agent-gateway@<profile>.service runs it with the
// profile's environment file; it checks that the environment is consistent, prints one alignment
// banner line, moves into the release tree and execs the runtime. With --probe it runs the
// isolation probe instead (agent-gateway-probe@<profile>.service) and exits with its result.
package main

import (
	"fmt"
	"os"
	"syscall"

	"github.com/agent-gateway/gateway-operator/nodeagent/isolation/probe"
	"github.com/agent-gateway/gateway-operator/nodeagent/launcher"
)

func main() {
	if len(os.Args) == 2 && os.Args[1] == "--probe" {
		cfg, err := probe.FromEnv(os.Environ())
		if err != nil {
			fmt.Fprintf(os.Stderr, "launch --probe: %v\n", err)
			os.Exit(probe.ExitUsage)
		}
		os.Exit(probe.Run(cfg, os.Stdout))
	}
	plan, err := launcher.Resolve(os.Environ(), os.Getpid())
	if err != nil {
		fmt.Fprintf(os.Stderr, "launch: %v\n", err)
		os.Exit(launcher.ExitConfig)
	}
	fmt.Println(plan.Banner)
	if os.Getenv(launcher.DryRunVar) == "1" {
		fmt.Println("exec: " + launcher.Command(plan.Argv))
		return
	}
	if err := os.Chdir(plan.Dir); err != nil {
		fmt.Fprintf(os.Stderr, "launch: %v\n", err)
		os.Exit(launcher.ExitConfig)
	}
	err = syscall.Exec(plan.Argv[0], plan.Argv, plan.Env) //nolint:gosec // running the command resolved from the root-owned env file is the launcher's job
	fmt.Fprintf(os.Stderr, "launch: exec %s: %v\n", plan.Argv[0], err)
	os.Exit(launcher.ExitExec)
}
