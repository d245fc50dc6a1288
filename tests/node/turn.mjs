// One chat turn with the official SDK, the way Node agent code runs one: the request comes as JSON in argv[2];
// streamed turns go through the SDK's own ChatCompletionStream, which assembles tool calls from their deltas.
// Usage: MODELMAX_API_KEY=... MODELMAX_BASE_URL=http://127.0.0.1:8000/v1 node turn.mjs '{"model": ..., ...}'
// Prints the first choice (message and finish_reason) as one JSON line, for tests/e2e/test_node_sdk.py.
import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.MODELMAX_API_KEY,
  baseURL: process.env.MODELMAX_BASE_URL,
  maxRetries: 0,
});
const request = JSON.parse(process.argv[2]);

const completion = request.stream
  ? await client.chat.completions.stream(request).finalChatCompletion()
  : await client.chat.completions.create(request);
const choice = completion.choices[0];
console.log(JSON.stringify({ message: choice.message, finish_reason: choice.finish_reason }));
