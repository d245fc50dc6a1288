// A two-step tool loop with the official Anthropic SDK, the way Node agent code runs one: ask with a tool, run
// the tool the model calls, send its result back, read the answer. argv[2] is "plain" (messages.create) or
// "stream" (messages.stream and its finalMessage(), which assembles tool input from its input_json_delta pieces).
// Usage: MODELMAX_API_KEY=... MODELMAX_BASE_URL=http://127.0.0.1:8000 node messages.mjs plain|stream '<model>'
// (the base URL without /v1: the SDK appends /v1/messages). Prints both messages (and, streamed, the event types
// the SDK saw) as one JSON line, for tests/e2e/test_anthropic_node.py.
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({
  apiKey: process.env.MODELMAX_API_KEY,
  baseURL: process.env.MODELMAX_BASE_URL,
  maxRetries: 0,
});
const mode = process.argv[2];
const model = process.argv[3];

const tools = [
  {
    name: "get_weather",
    description: "The current temperature in a city.",
    input_schema: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
];
const temperatures = { Paris: 18, Tokyo: 25 };

async function turn(messages) {
  const request = { model, max_tokens: 1024, system: "Use the tools.", tools, messages };
  if (mode !== "stream") {
    return { message: await client.messages.create(request), events: [] };
  }
  const stream = client.messages.stream(request);
  const events = [];
  stream.on("streamEvent", (event) => events.push(event.type));
  return { message: await stream.finalMessage(), events };
}

const question = { role: "user", content: "Is it warm in Paris?" };
const first = await turn([question]);
const results = first.message.content
  .filter((block) => block.type === "tool_use")
  .map((call) => ({
    type: "tool_result",
    tool_use_id: call.id,
    content: JSON.stringify({ city: call.input.city, celsius: temperatures[call.input.city] }),
  }));
const final = await turn([
  question,
  { role: "assistant", content: first.message.content },
  { role: "user", content: results },
]);
console.log(JSON.stringify({ first: first.message, firstEvents: first.events, final: final.message, finalEvents: final.events }));
