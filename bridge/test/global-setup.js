// Starts the RunPod stand-in on a free 127.0.0.1 port for the whole test run.
import { startStandin } from "./runpod-standin.js";

export default async function setup(project) {
  const server = await startStandin();
  project.provide("runpodPort", server.address().port);
  return () => new Promise((resolve) => server.close(resolve));
}
