// Prints the size of the minified bundle, raw and gzipped (level 9): what a page downloads.
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const file = join(dirname(fileURLToPath(import.meta.url)), '../dist/gapless.min.js');
const code = readFileSync(file);
const gz = gzipSync(code, { level: 9 });
const kib = (n) => (n / 1024).toFixed(2);
console.log(`dist/gapless.min.js: ${kib(code.length)} KiB minified, ${kib(gz.length)} KiB minified + gzipped`);
