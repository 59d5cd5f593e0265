"""OpenAI's GPT-Live protocol, sans-IO: events both ways and utterances from the timeline."""
