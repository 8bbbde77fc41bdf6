// Command sdkdriver drives a Propeller manager with upstream's own Go SDK
// (github.com/absmach/propeller/pkg/sdk, v0.5.0), the way propeller-cli does:
// wait for an alive proplet, create a task, start it, wait for its outcome,
// list, delete, and check the deleted task is gone.
//
// It prints one JSON line per step on stdout, {"step":...,"ok":true,...},
// and stops at the first failure with {"step":...,"ok":false,"error":...}
// on stdout, the same reason on stderr, and exit status 1.
//
// The SDK's Task has no inputs field, so the task that runs is created with
// a raw POST /tasks whose body is upstream's pkg/task.Task (inputs are
// task.FlexStrings); everything else goes through the SDK.
//
// Built in GOPATH mode (GO111MODULE=off) with upstream's pkg/{sdk,task,
// proplet,sdf} under $GOPATH/src/github.com/absmach/propeller/pkg/; it needs
// only the Go standard library (Go 1.19 or later).
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/absmach/propeller/pkg/sdk"
	"github.com/absmach/propeller/pkg/task"
)

func main() {
	managerURL := flag.String("manager", "http://127.0.0.1:7070", "the manager's base URL")
	image := flag.String("image", "add.wasm", "the task's image_url")
	inputs := flag.String("inputs", "3,4", "the task's inputs, comma-separated")
	name := flag.String("name", "add", "the task's name: the function to run")
	propletWait := flag.Duration("proplet-wait", 30*time.Second, "how long to wait for an alive proplet")
	taskWait := flag.Duration("task-wait", 60*time.Second, "how long to wait for the task to finish")
	flag.Parse()

	base := strings.TrimRight(*managerURL, "/")
	client := sdk.NewSDK(sdk.Config{ManagerURL: base})

	// 1. A proplet is alive.
	var alive sdk.Proplet
	deadline := time.Now().Add(*propletWait)
	for {
		page, err := client.ListProplets(0, 10, "")
		if err == nil {
			found := false
			for _, p := range page.Proplets {
				if p.Alive {
					alive, found = p, true

					break
				}
			}
			if found {
				report("proplets", map[string]any{"proplet_id": alive.ID, "name": alive.Name, "total": page.Total})

				break
			}
		}
		if time.Now().After(deadline) {
			fail("proplets", fmt.Sprintf("no alive proplet within %s (last error: %v)", *propletWait, err))
		}
		time.Sleep(200 * time.Millisecond)
	}

	// 2. SDK CreateTask, exactly as propeller-cli sends it (no inputs): the
	// manager must take the SDK's JSON and answer 201 with a task it can decode.
	plain, err := client.CreateTask(sdk.Task{Name: *name, ImageURL: *image})
	if err != nil {
		fail("create", "sdk.CreateTask: "+err.Error())
	}
	if plain.ID == "" {
		fail("create", "the created task has no id")
	}
	if plain.State != uint8(task.Pending) {
		fail("create", fmt.Sprintf("the created task has state %d, want %d (Pending)", plain.State, task.Pending))
	}
	if plain.CreatedAt.IsZero() {
		fail("create", "the created task has no created_at")
	}
	report("create", map[string]any{"id": plain.ID, "state": plain.State, "created_at": plain.CreatedAt})

	// 3. The task that runs: upstream's task.Task with inputs, as JSON.
	var args task.FlexStrings
	for _, in := range strings.Split(*inputs, ",") {
		if in = strings.TrimSpace(in); in != "" {
			args = append(args, in)
		}
	}
	created, err := createWithInputs(base, task.Task{Name: *name, ImageURL: *image, Inputs: args})
	if err != nil {
		fail("create_inputs", err.Error())
	}
	if created.ID == "" || created.ID == plain.ID {
		fail("create_inputs", fmt.Sprintf("the created task has id %q", created.ID))
	}
	if created.State != task.Pending {
		fail("create_inputs", fmt.Sprintf("the created task has state %d, want %d (Pending)", created.State, task.Pending))
	}
	if strings.Join(created.Inputs, ",") != strings.Join(args, ",") {
		fail("create_inputs", fmt.Sprintf("the created task has inputs %q, want %q", []string(created.Inputs), []string(args)))
	}
	report("create_inputs", map[string]any{"id": created.ID, "inputs": created.Inputs})

	// 4. Start it.
	if err := client.StartTask(created.ID); err != nil {
		fail("start", "sdk.StartTask: "+err.Error())
	}
	report("start", map[string]any{"id": created.ID})

	// 5. Wait until it is Completed or Failed.
	var done sdk.Task
	deadline = time.Now().Add(*taskWait)
	for {
		t, err := client.GetTask(created.ID)
		if err == nil && (t.State == uint8(task.Completed) || t.State == uint8(task.Failed)) {
			done = t

			break
		}
		if time.Now().After(deadline) {
			fail("wait", fmt.Sprintf("task %s not finished within %s (state %d, last error: %v)", created.ID, *taskWait, t.State, err))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if done.State != uint8(task.Completed) {
		reason := fmt.Sprintf("task %s ended %s", done.ID, task.State(done.State))
		if full, err := getFull(base, done.ID); err == nil {
			reason += fmt.Sprintf(": error %q, results %v", full.Error, full.Results)
		}
		fail("wait", reason)
	}
	report("wait", map[string]any{
		"id":          done.ID,
		"state":       done.State,
		"state_name":  task.State(done.State).String(),
		"results":     done.Results,
		"start_time":  done.StartTime,
		"finish_time": done.FinishTime,
	})

	// 6. List: both tasks are there.
	page, err := client.ListTasks(sdk.PageMetadata{Limit: 10})
	if err != nil {
		fail("list", "sdk.ListTasks: "+err.Error())
	}
	if page.Total < 1 {
		fail("list", fmt.Sprintf("total %d", page.Total))
	}
	listed := map[string]sdk.Task{}
	for _, t := range page.Tasks {
		listed[t.ID] = t
	}
	for _, id := range []string{created.ID, plain.ID} {
		if _, ok := listed[id]; !ok {
			fail("list", fmt.Sprintf("task %s is not in the first page (total %d, %d tasks)", id, page.Total, len(page.Tasks)))
		}
	}
	if listed[created.ID].State != uint8(task.Completed) {
		fail("list", fmt.Sprintf("task %s is listed with state %d", created.ID, listed[created.ID].State))
	}
	report("list", map[string]any{"total": page.Total, "offset": page.Offset, "limit": page.Limit, "count": len(page.Tasks)})

	// 7. Delete both.
	for _, id := range []string{created.ID, plain.ID} {
		if err := client.DeleteTask(id); err != nil {
			fail("delete", fmt.Sprintf("sdk.DeleteTask(%s): %v", id, err))
		}
	}
	report("delete", map[string]any{"ids": []string{created.ID, plain.ID}})

	// 8. A deleted task is gone: 404.
	if t, err := client.GetTask(created.ID); err == nil {
		fail("get_deleted", fmt.Sprintf("task %s still answers after delete: state %d", t.ID, t.State))
	} else if !strings.Contains(err.Error(), "404") {
		fail("get_deleted", "want a 404, got: "+err.Error())
	} else {
		report("get_deleted", map[string]any{"error": err.Error()})
	}
}

// createWithInputs POSTs t as JSON to /tasks, the way the SDK posts its own
// Task, and decodes the 201 answer as upstream's task.Task.
func createWithInputs(base string, t task.Task) (task.Task, error) {
	body, err := json.Marshal(t)
	if err != nil {
		return task.Task{}, err
	}
	resp, err := http.Post(base+"/tasks", sdk.CTJSON, bytes.NewReader(body))
	if err != nil {
		return task.Task{}, err
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(resp.Body)
	if err != nil {
		return task.Task{}, err
	}
	if resp.StatusCode != http.StatusCreated {
		return task.Task{}, fmt.Errorf("POST /tasks %s: %d %s", body, resp.StatusCode, strings.TrimSpace(string(answer)))
	}
	var created task.Task
	if err := json.Unmarshal(answer, &created); err != nil {
		return task.Task{}, fmt.Errorf("decode %s as task.Task: %w", answer, err)
	}

	return created, nil
}

// getFull reads a task as upstream's task.Task, which, unlike the SDK's,
// has the error.
func getFull(base, id string) (task.Task, error) {
	resp, err := http.Get(base + "/tasks/" + id)
	if err != nil {
		return task.Task{}, err
	}
	defer resp.Body.Close()
	var t task.Task
	if err := json.NewDecoder(resp.Body).Decode(&t); err != nil {
		return task.Task{}, err
	}

	return t, nil
}

func report(step string, fields map[string]any) {
	line := map[string]any{"step": step, "ok": true}
	for k, v := range fields {
		line[k] = v
	}
	out, err := json.Marshal(line)
	if err != nil {
		fail(step, "marshal the report: "+err.Error())
	}
	fmt.Println(string(out))
}

func fail(step, reason string) {
	reason = strings.ReplaceAll(reason, "\n", " ")
	out, _ := json.Marshal(map[string]any{"step": step, "ok": false, "error": reason})
	fmt.Println(string(out))
	fmt.Fprintf(os.Stderr, "sdkdriver: %s: %s\n", step, reason)
	os.Exit(1)
}
