// Package images reads config/images.env, the one place that names the operator's images, and
// builds the images for tests the way make images does.
package images

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/agent-gateway/gateway-operator/test/repo"
)

// Names are the images' names and their common tag.
type Names struct {
	Manager, Agent, Tag string
}

// ManagerRef is the manager image as name:tag.
func (n Names) ManagerRef() string { return n.Manager + ":" + n.Tag }

// AgentRef is the node agent image as name:tag.
func (n Names) AgentRef() string { return n.Agent + ":" + n.Tag }

// Load reads config/images.env.
func Load() (Names, error) {
	p, err := repo.Path("config/images.env")
	if err != nil {
		return Names{}, err
	}
	b, err := os.ReadFile(p) //nolint:gosec // a file of this repository
	if err != nil {
		return Names{}, err
	}
	env := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			env[k] = v
		}
	}
	n := Names{Manager: env["MANAGER_IMAGE"], Agent: env["AGENT_IMAGE"], Tag: env["IMAGE_TAG"]}
	if n.Manager == "" || n.Agent == "" || n.Tag == "" {
		return n, fmt.Errorf("%s must set MANAGER_IMAGE, AGENT_IMAGE and IMAGE_TAG", p)
	}
	return n, nil
}

// Build runs hack/images as make images does, writing into out, and returns what it printed:
// one name:tag@digest line per image.
func Build(out string) ([]string, error) {
	root, err := repo.Path(".")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("go", "run", "./hack/images", "--out", out, "--config", "config/images.env")
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("hack/images: %v\n%s", err, stderr.String())
	}
	return strings.Fields(string(stdout)), nil
}
