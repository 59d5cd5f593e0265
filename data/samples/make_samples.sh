#!/bin/sh
# Regenerate the speech samples in this directory with espeak-ng and sox.
# Output: 16 kHz mono 16-bit PCM WAV, 0.3 s of silence at the start and 0.5 s at the end.
set -eu
cd "$(dirname "$0")"

VOICE="${VOICE:-en-us}"
SPEED="${SPEED:-170}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# say TEXT OUT: speak TEXT into OUT as 16 kHz mono 16-bit, espeak-ng's own leading and
# trailing silence trimmed.
say() {
    espeak-ng -v "$VOICE" -s "$SPEED" -w "$tmp/raw.wav" "$1"
    sox "$tmp/raw.wav" -r 16000 -c 1 -b 16 -e signed-integer "$2" \
        silence 1 0.01 0.1% reverse silence 1 0.01 0.1% reverse
}

# pad IN OUT: add 0.3 s of leading and 0.5 s of trailing silence.
pad() {
    sox "$1" "$2" pad 0.3 0.5
}

say "Hello R2. Can you hear me?" "$tmp/hello.wav"
pad "$tmp/hello.wav" hello.wav

say "What time is it on Mars right now?" "$tmp/question.wav"
pad "$tmp/question.wav" question.wav

# Two conversation turns: two sentences separated by 1.5 s of silence.
say "Hi there. My name is Luke." "$tmp/turn1.wav"
say "Tell me a short joke about droids." "$tmp/turn2.wav"
sox -n -r 16000 -c 1 -b 16 -e signed-integer "$tmp/gap.wav" trim 0 1.5
sox "$tmp/turn1.wav" "$tmp/gap.wav" "$tmp/turn2.wav" "$tmp/two_turns.wav"
pad "$tmp/two_turns.wav" two_turns.wav

for f in hello.wav question.wav two_turns.wav; do
    printf '%s: %s s, %s bytes\n' "$f" "$(soxi -D "$f")" "$(wc -c < "$f")"
done
